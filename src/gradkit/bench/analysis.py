"""Turn the stored trials of one suite into study results, standings and tables (no I/O).

Imports neither torch nor the runner (``gradkit report`` works without torch).

Every number here is a deterministic function of the database. Columns whose name contains
``seconds`` are wall-clock measurements (they differ between runs of the same command);
every other column depends only on step-based outcomes and the set of trials, so two complete
runs of the same command give identical values there (the kill-and-resume test relies on it).
The bootstrap intervals are seeded (:data:`gradkit.bench.scoring.BOOTSTRAP_SEED`), so they are
deterministic too.

Wall-clock below :data:`MIN_SECONDS` is timing noise (a few hundred steps of a toy model on a
shared CPU): a workload whose fastest median time to target is below it is left out of the
wall-clock scores and speedups (the step-based ones keep it), and the report greys such cells.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from gradkit.bench import scoring
from gradkit.bench.records import Diagnostic, TrialRecord
from gradkit.bench.scoring import round_sig, select
from gradkit.bench.store import Store

Table = tuple[list[str], list[list[Any]]]

#: Wall-clock times to target below this many seconds are noise: not scored, flagged.
MIN_SECONDS = 0.1
BASES = ("steps", "seconds")


@dataclass
class StudyResult:
    workload: str
    optimizer: str
    baseline: bool
    space: str
    n_trials: int
    seeds: list[int]
    tune: list[TrialRecord] = field(default_factory=list)
    selected: TrialRecord | None = None
    final: list[TrialRecord] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return len(self.tune) >= self.n_trials + 1 and len(self.final) == len(self.seeds)

    def seed_times(self, basis: str) -> list[float]:
        """Per seed of the selected configuration: steps or seconds to target (inf = missed)."""
        column = f"{basis}_to_target"
        return [math.inf if getattr(r, column) is None else float(getattr(r, column))
                for r in self.final]

    def to_target(self, basis: str) -> tuple[float, float, float]:
        """Median, min, max over seeds of steps or seconds to target (inf = missed)."""
        values = self.seed_times(basis)
        return scoring.median_and_range(values) if values else (math.inf,) * 3

    def metric(self, column: str) -> tuple[float, float, float]:
        values = [math.nan if getattr(r, column) is None else float(getattr(r, column))
                  for r in self.final]
        finite = [v for v in values if math.isfinite(v)]
        if len(finite) < len(values):  # a diverged/failed seed has no final metric
            return (math.nan, math.nan, math.nan)
        return scoring.median_and_range(finite)

    def reached(self) -> int:
        return sum(r.steps_to_target is not None for r in self.final)


@dataclass(frozen=True)
class Standing:
    """One optimizer's line of the leaderboard (``*_ci``: 95 % bootstrap interval)."""

    optimizer: str
    baseline: bool
    rank: int
    score_steps: float
    score_steps_ci: tuple[float, float]
    score_seconds: float  # NaN when no workload is timed (see MIN_SECONDS)
    score_seconds_ci: tuple[float, float]
    reached: int  # workloads whose target the median seed reached
    fastest: int  # workloads where it has the best median steps to target
    speedup_steps: float  # geometric mean vs the best torch.optim baseline per workload
    speedup_steps_ci: tuple[float, float]
    missed_steps: int  # workloads in that mean the optimizer missed (counted at the budget)
    speedup_seconds: float
    speedup_seconds_ci: tuple[float, float]
    missed_seconds: int
    failed_trials: int
    diverged_trials: int


@dataclass
class Analysis:
    suite: str
    version: str
    workloads: list[dict[str, Any]]
    optimizers: list[str]
    studies: dict[tuple[str, str], StudyResult]
    notes: list[str]
    trials: list[TrialRecord]
    environment: str = ""

    @property
    def baselines(self) -> np.ndarray:
        flags = {o: False for o in self.optimizers}
        for (_, o), s in self.studies.items():
            flags[o] = flags[o] or s.baseline
        return np.array([flags[o] for o in self.optimizers], dtype=bool)

    def times(self, basis: str) -> np.ndarray:
        """``(workloads × optimizers)`` median time to target (steps or seconds)."""
        out = np.full((len(self.workloads), len(self.optimizers)), np.inf)
        for i, w in enumerate(self.workloads):
            for j, o in enumerate(self.optimizers):
                if (w["name"], o) in self.studies:
                    out[i, j] = self.studies[w["name"], o].to_target(basis)[0]
        return out

    def samples(self, basis: str) -> list[list[list[float]]]:
        """``[workload][optimizer]`` per-seed times to target (the bootstrap's input)."""
        return [[self.studies[w["name"], o].seed_times(basis)
                 if (w["name"], o) in self.studies else [] for o in self.optimizers]
                for w in self.workloads]

    def budget(self, basis: str) -> np.ndarray:
        """Per workload, the time a missed target counts as in geometric-mean speedups.

        Steps: the workload's step budget. Seconds: the longest full-budget training time
        measured on the workload (a trial stopped early is scaled up to the whole budget).
        Never below a measured time to target.
        """
        out = np.ones(len(self.workloads))
        for i, w in enumerate(self.workloads):
            rows = [r for r in self.trials if r.workload == w["name"]]
            if basis == "steps":
                values = [float(w["steps"])] + [float(r.steps_to_target) for r in rows
                                                  if r.steps_to_target is not None]
            else:
                values = [r.train_seconds * w["steps"] / r.steps_done for r in rows
                          if r.steps_done > 0 and r.train_seconds > 0]
                values += [r.seconds_to_target for r in rows if r.seconds_to_target]
            out[i] = max(values, default=1.0)
        return out

    def timed(self) -> np.ndarray:
        """Per workload: is its fastest median wall-clock time to target ≥ MIN_SECONDS?"""
        secs = self.times("seconds")
        fastest = np.where(np.isfinite(secs), secs, np.inf).min(axis=1, initial=np.inf)
        return ~(fastest < MIN_SECONDS)

    @cached_property
    def standings(self) -> list[Standing]:
        return _standings(self)


def analyze(store: Store, suite: str, version: str) -> Analysis:
    workloads = store.workloads(suite, version)
    direction = {w["name"]: w["higher_is_better"] for w in workloads}
    trials = store.trials(suite, version)
    studies: dict[tuple[str, str], StudyResult] = {}
    for s in store.studies(suite, version):
        if s["workload"] in direction:
            studies[s["workload"], s["optimizer"]] = StudyResult(
                s["workload"], s["optimizer"], bool(s["torch_baseline"]), s["space"],
                s["n_trials"], s["seeds"])
    for row in trials:
        study = studies.get((row.workload, row.optimizer))
        if study is not None and row.phase == "tune":
            study.tune.append(row)
    for (w, _), study in studies.items():
        study.tune.sort(key=lambda r: r.trial_index)
        if not study.tune:
            continue
        study.selected = select(study.tune, direction[w])
        chosen = study.selected.hparams
        study.final = sorted(
            (r for r in trials if (r.workload, r.optimizer) == (w, study.optimizer)
             and r.hparams == chosen and r.seed in study.seeds),
            key=lambda r: r.seed)
    optimizers = sorted({o for _, o in studies})
    return Analysis(suite, version, workloads, optimizers, studies,
                    store.notes(suite, version), trials,
                    store.meta(f"environment:{suite}:{version}") or "")


# ------------------------------------------------------------------------------ standings
def _statistic(baseline: np.ndarray, budget: np.ndarray):
    """times -> [scores..., geometric-mean speedups...] (the bootstrapped vector)."""
    def stat(times: np.ndarray) -> np.ndarray:
        gm = scoring.geometric_mean_speedup(times, baseline, budget)
        return np.concatenate([scoring.score(times), gm.value])
    return stat


def _basis_numbers(a: Analysis, basis: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    n_o = len(a.optimizers)
    times = a.times(basis)[rows]
    budget = a.budget(basis)[rows]
    stat = _statistic(a.baselines, budget)
    point = stat(times)
    samples = [s for s, keep in zip(a.samples(basis), rows) if keep]
    low, high = scoring.interval(scoring.bootstrap(samples, stat)) if samples else (
        np.full(2 * n_o, np.nan), np.full(2 * n_o, np.nan))
    gm = scoring.geometric_mean_speedup(times, a.baselines, budget)
    return {"score": point[:n_o], "score_low": low[:n_o], "score_high": high[:n_o],
            "speedup": point[n_o:], "speedup_low": low[n_o:], "speedup_high": high[n_o:],
            "missed": gm.missed, "times": times}


def _standings(a: Analysis) -> list[Standing]:
    if not a.optimizers or not a.workloads:
        return []
    steps = _basis_numbers(a, "steps", np.ones(len(a.workloads), dtype=bool))
    secs = _basis_numbers(a, "seconds", a.timed())
    ranks = scoring.shared_ranks(steps["score"], steps["score_low"], steps["score_high"])
    ratios = scoring.performance_ratios(steps["times"])
    out = []
    for j, o in enumerate(a.optimizers):
        mine = [r for r in a.trials if r.optimizer == o]
        out.append(Standing(
            o, bool(a.baselines[j]), int(ranks[j]),
            float(steps["score"][j]), (float(steps["score_low"][j]),
                                       float(steps["score_high"][j])),
            float(secs["score"][j]), (float(secs["score_low"][j]), float(secs["score_high"][j])),
            int(np.isfinite(steps["times"][:, j]).sum()), int((ratios[:, j] == 1.0).sum()),
            float(steps["speedup"][j]), (float(steps["speedup_low"][j]),
                                         float(steps["speedup_high"][j])),
            int(steps["missed"][j]),
            float(secs["speedup"][j]), (float(secs["speedup_low"][j]),
                                        float(secs["speedup_high"][j])),
            int(secs["missed"][j]),
            sum(r.status in ("failed", "crashed") for r in mine),
            sum(r.status == "diverged" for r in mine)))
    out.sort(key=lambda s: (s.rank, -s.score_steps, s.optimizer))
    return out


def fmt(value: Any, digits: int = 3) -> str:
    """A number as the report shows it: ``digits`` significant digits, ``∞``, ``–`` for none."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float | int | np.floating | np.integer):
        value = float(value)
        if math.isnan(value):
            return "–"
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        if value == int(value) and abs(value) < 1e6:
            return str(int(value))
        return f"{round_sig(value, digits):g}"
    return str(value)


def fmt_interval(low: float, high: float) -> str:
    """`` [low–high]`` (``[x]`` when both ends print alike; empty when undefined)."""
    if math.isnan(low) or math.isnan(high):
        return ""
    if fmt(low) == fmt(high):
        return f" [{fmt(low)}]"
    return f" [{fmt(low)}–{fmt(high)}]"


def _names(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def verdict(a: Analysis) -> str:
    """The report's opening sentences: who did best, where, by how much, how sure."""
    board = a.standings
    if not board:
        return "No results yet: the database has no finished studies for this suite."
    n = len(a.workloads)
    top = [s for s in board if s.rank == 1]
    first = top[0]
    who = (f"{first.optimizer}{' (torch.optim)' if first.baseline else ''} ranks first"
           if len(top) == 1 else
           f"{_names([s.optimizer for s in top])} share the first rank (their 95 % intervals "
           "overlap or their scores are equal)")
    seeds = sorted({len(s.final) for s in a.studies.values()})
    text = [f"{who}: step-based score {fmt(first.score_steps)}"
            f"{fmt_interval(*first.score_steps_ci)}"
            f"{' for ' + first.optimizer if len(top) > 1 else ''}, fastest to the validation "
            f"target on {first.fastest} of {n} workloads and reaching it on {first.reached} of "
            f"{n}."]
    contenders = [s for s in board if not s.baseline]
    if not a.baselines.any():
        text.append("No torch.optim baseline ran, so there are no speedups.")
    elif contenders:
        best = contenders[0]  # board is sorted by rank, then score
        lead = ("It" if best is first else
                f"The best-ranked optimizer that is not from torch.optim, {best.optimizer} "
                f"(rank {best.rank}),")
        factor = best.speedup_steps
        if factor > 0 and round_sig(factor) != 1:
            ratio = f", i.e. it needs {fmt(1 / factor)}× as many steps"
        else:
            ratio = ""
        missed = (f"; it missed {best.missed_steps} of {n} targets, each counted as the whole "
                  "step budget" if best.missed_steps else "")
        text.append(f"{lead} has a geometric-mean speedup in steps of {fmt(factor)}×"
                    f"{fmt_interval(*best.speedup_steps_ci)} over the best torch.optim "
                    f"baseline of each workload{ratio}{missed}.")
    else:
        text.append("Every optimizer in this run is a torch.optim baseline.")
    text.append(f"Intervals: 95 %, seeded bootstrap over the {_names([str(k) for k in seeds])} "
                "seed runs of each selected configuration.")
    return " ".join(text)


# ---------------------------------------------------------------------------------- tables
def leaderboard(a: Analysis) -> Table:
    headers = ["rank", "optimizer", "torch_baseline", "score_steps", "score_steps_low",
               "score_steps_high", "targets_reached", "fastest_steps", "geomean_speedup_steps",
               "geomean_speedup_steps_low", "geomean_speedup_steps_high", "missed_steps",
               "score_seconds", "score_seconds_low", "score_seconds_high",
               "geomean_speedup_seconds", "geomean_speedup_seconds_low",
               "geomean_speedup_seconds_high", "missed_seconds_timed_workloads",
               "failed_trials", "diverged_trials"]
    n = len(a.workloads)
    rows = [[s.rank, s.optimizer, s.baseline, _round(s.score_steps), *map(_round, s.score_steps_ci),
             f"{s.reached}/{n}", s.fastest, _round(s.speedup_steps),
             *map(_round, s.speedup_steps_ci), s.missed_steps, _round(s.score_seconds),
             *map(_round, s.score_seconds_ci), _round(s.speedup_seconds),
             *map(_round, s.speedup_seconds_ci), s.missed_seconds, s.failed_trials,
             s.diverged_trials] for s in a.standings]
    return headers, rows


def time_to_target(a: Analysis) -> Table:
    headers = ["workload", "optimizer", "median_steps", "min_steps", "max_steps",
               "speedup_steps", "seeds_reached", "median_seconds", "min_seconds",
               "max_seconds", "speedup_seconds"]
    rows = []
    if not a.optimizers:
        return headers, rows
    sp_steps = scoring.speedups(a.times("steps"), a.baselines)
    sp_secs = scoring.speedups(a.times("seconds"), a.baselines)
    for i, w in enumerate(a.workloads):
        for j, o in enumerate(a.optimizers):
            s = a.studies.get((w["name"], o))
            if s is None:
                continue
            steps, secs = s.to_target("steps"), s.to_target("seconds")
            rows.append([w["name"], o, *steps, _round(sp_steps[i, j]),
                         f"{s.reached()}/{len(s.final)}", *(_round(v) for v in secs),
                         _round(sp_secs[i, j])])
    return headers, rows


def final_metrics(a: Analysis) -> Table:
    headers = ["workload", "optimizer", "metric", "selected_hparams", "selected_trial",
               "median_val", "min_val", "max_val", "median_test", "min_test", "max_test",
               "seeds", "complete"]
    rows = []
    for w in a.workloads:
        for o in a.optimizers:
            s = a.studies.get((w["name"], o))
            if s is None or s.selected is None:
                continue
            rows.append([w["name"], o, w["metric"], json.dumps(s.selected.hparams,
                         sort_keys=True), s.selected.trial_index,
                         *(_round(v) for v in s.metric("final_val_metric")),
                         *(_round(v) for v in s.metric("final_test_metric")),
                         len(s.final), s.complete])
    return headers, rows


def trials_table(a: Analysis) -> Table:
    headers = ["key", "workload", "optimizer", "phase", "trial_index", "seed", "hparams",
               "status", "steps_to_target", "final_val_metric", "final_test_metric",
               "error", "seconds_to_target", "train_seconds"]
    rows = [[r.key, r.workload, r.optimizer, r.phase, r.trial_index, r.seed,
             json.dumps(r.hparams, sort_keys=True), r.status, r.steps_to_target,
             _round(r.final_val_metric), _round(r.final_test_metric),
             r.error or r.divergence or "", _round(r.seconds_to_target),
             _round(r.train_seconds)]
            for r in sorted(a.trials, key=lambda r: (r.workload, r.optimizer,
                                                      r.trial_index, r.seed, r.key))]
    return headers, rows


# ----------------------------------------------------------------------------- diagnostics
#: Readings keyed by trial key, as :meth:`gradkit.bench.store.Store.diagnostics` returns them.
Readings = dict[str, list[Diagnostic]]


def diagnosed_trials(a: Analysis) -> list[tuple[str, TrialRecord]]:
    """The trials whose ``--diagnose`` readings the report shows, with their role:
    ``("selected", r)`` for every seed of a selected configuration and ``("diverged", r)``
    for every diverged trial (tuning or seed)."""
    out: list[tuple[str, TrialRecord]] = []
    for w in a.workloads:
        for o in a.optimizers:
            s = a.studies.get((w["name"], o))
            if s is None:
                continue
            out += [("selected", r) for r in s.final if r.status != "diverged"]
            out += [("diverged", r) for r in a.trials
                    if (r.workload, r.optimizer) == (w["name"], o) and r.status == "diverged"]
    seen: set[str] = set()
    return [(role, r) for role, r in out if not (r.key in seen or seen.add(r.key))]


def edge_of_stability(sharpness: float | None, lr: float | None) -> float | None:
    """``sharpness / (2 / lr)``: gradient descent at learning rate ``lr`` is unstable on a
    quadratic with this curvature when it exceeds 1 (momentum and adaptive methods have other
    thresholds; this one is the common yardstick)."""
    if sharpness is None or not lr or not math.isfinite(sharpness):
        return None
    return sharpness * lr / 2.0


def diagnostics_table(a: Analysis, readings: Readings) -> Table:
    """Every reading of the diagnosed trials, long format (one row per step and name)."""
    headers = ["workload", "optimizer", "role", "trial_index", "seed", "lr", "status", "step",
               "name", "value"]
    rows = []
    for role, r in diagnosed_trials(a):
        for d in readings.get(r.key, []):
            rows.append([r.workload, r.optimizer, role, r.trial_index, r.seed,
                         r.hparams.get("lr"), r.status, d.step, d.name, _round(d.value)])
    return headers, rows


def divergence_table(a: Analysis, readings: Readings) -> Table:
    """Per diverged trial with readings: its last readings before it stopped, and the
    sharpness against gradient descent's threshold ``2/η``."""
    names = sorted({d.name for _, r in diagnosed_trials(a) for d in readings.get(r.key, [])})
    headers = ["workload", "optimizer", "trial", "seed", "lr", "stopped at step",
               "last reading at step", *names]
    if "sharpness" in names:
        headers += ["2/lr", "sharpness / (2/lr)"]
    rows = []
    for role, r in diagnosed_trials(a):
        got = readings.get(r.key, [])
        if role != "diverged" or not got:
            continue
        last = max(d.step for d in got)
        value = {d.name: d.value for d in got if d.step == last}
        row = [r.workload, r.optimizer, r.trial_index, r.seed, r.hparams.get("lr"),
               r.steps_done, last, *(value.get(n) for n in names)]
        if "sharpness" in names:
            lr = r.hparams.get("lr")
            row += [2.0 / lr if lr else None, edge_of_stability(value.get("sharpness"), lr)]
        rows.append(row)
    return headers, rows


def _round(value: Any, digits: int = 4) -> Any:
    """CSV precision: ``digits`` significant digits (the HTML and text show 3)."""
    if value is None:
        return None
    value = float(value)
    return value if not math.isfinite(value) else round_sig(value, digits)
