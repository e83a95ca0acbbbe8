"""Turn the stored trials of one suite into study results and tables (no plotting, no I/O).

Every number here is a deterministic function of the database. Columns whose name contains
``seconds`` are wall-clock measurements (they differ between runs of the same command);
every other column depends only on step-based outcomes and the set of trials, so two complete
runs of the same command give identical values there (the kill-and-resume test relies on it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradkit.bench import scoring
from gradkit.bench.protocol import select
from gradkit.bench.records import TrialRecord
from gradkit.bench.store import Store

Table = tuple[list[str], list[list[Any]]]


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

    def to_target(self, basis: str) -> tuple[float, float, float]:
        """Median, min, max over seeds of steps or seconds to target (inf = missed)."""
        column = f"{basis}_to_target"
        raw = [getattr(r, column) for r in self.final]
        values = [math.inf if v is None else float(v) for v in raw]
        return scoring.median_and_range(values) if values else (math.inf,) * 3

    def metric(self, column: str) -> tuple[float, float, float]:
        raw = [getattr(r, column) for r in self.final]
        values = [math.nan if v is None else float(v) for v in raw]
        finite = [v for v in values if math.isfinite(v)]
        if len(finite) < len(values):  # a diverged/failed seed has no final metric
            return (math.nan, math.nan, math.nan)
        return scoring.median_and_range(finite)

    def reached(self) -> int:
        return sum(r.steps_to_target is not None for r in self.final)


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


# ---------------------------------------------------------------------------------- tables
def leaderboard(a: Analysis) -> Table:
    headers = ["rank", "optimizer", "score_steps", "score_seconds", "targets_reached",
               "geomean_speedup_steps", "speedup_workloads", "geomean_speedup_seconds",
               "failed_trials", "diverged_trials"]
    if not a.optimizers or not a.workloads:
        return headers, []
    t_steps, t_secs = a.times("steps"), a.times("seconds")
    score_steps = scoring.integrated_score(scoring.performance_ratios(t_steps))
    score_secs = scoring.integrated_score(scoring.performance_ratios(t_secs))
    gm_steps, used = scoring.geometric_mean_speedup(scoring.speedups(t_steps, a.baselines))
    gm_secs, _ = scoring.geometric_mean_speedup(scoring.speedups(t_secs, a.baselines))
    rows = []
    for j, o in enumerate(a.optimizers):
        mine = [r for r in a.trials if r.optimizer == o]
        rows.append([0, o, round(float(score_steps[j]), 4), round(float(score_secs[j]), 4),
                     f"{int(np.isfinite(t_steps[:, j]).sum())}/{len(a.workloads)}",
                     _round(gm_steps[j]), int(used[j]), _round(gm_secs[j]),
                     sum(r.status == "failed" for r in mine),
                     sum(r.status == "diverged" for r in mine)])
    rows.sort(key=lambda r: (-r[2], r[1]))
    for rank, row in enumerate(rows, 1):
        row[0] = rank
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
                         *(_round(v, 6) for v in s.metric("final_val_metric")),
                         *(_round(v, 6) for v in s.metric("final_test_metric")),
                         len(s.final), s.complete])
    return headers, rows


def trials_table(a: Analysis) -> Table:
    headers = ["key", "workload", "optimizer", "phase", "trial_index", "seed", "hparams",
               "status", "steps_to_target", "final_val_metric", "final_test_metric",
               "error", "seconds_to_target", "train_seconds"]
    rows = [[r.key, r.workload, r.optimizer, r.phase, r.trial_index, r.seed,
             json.dumps(r.hparams, sort_keys=True), r.status, r.steps_to_target,
             _round(r.final_val_metric, 6), _round(r.final_test_metric, 6),
             r.error or r.divergence or "", _round(r.seconds_to_target),
             _round(r.train_seconds)]
            for r in sorted(a.trials, key=lambda r: (r.workload, r.optimizer,
                                                      r.trial_index, r.seed, r.key))]
    return headers, rows


def _round(value: Any, digits: int = 4) -> Any:
    if value is None:
        return None
    value = float(value)
    return value if not math.isfinite(value) else round(value, digits)
