"""Static report of a results database: ``index.html`` + PNG figures + CSV files.

Imports neither torch nor the runner: ``gradkit report`` runs with numpy, sqlite3 and
matplotlib only.

Files written to the output directory:

* ``index.html`` — the verdict (who did best, where, by how much against the best torch.optim
  baseline, with bootstrap intervals), the leaderboard, a glossary, the performance profile,
  time-to-target and selected-configuration tables (optimizers as rows, so twelve optimizers
  fit a 1280-px page), diagnostics of ``--diagnose`` runs, per-workload curves and
  LR-sensitivity plots, failed and diverged trials.
* ``leaderboard.csv``, ``time_to_target.csv``, ``final_metrics.csv``, ``trials.csv``, and
  ``diagnostics.csv`` when the run used ``--diagnose``.
* ``profile.png``, ``curves_<workload>.png``, ``lr_<workload>.png``, and
  ``diagnostics_<workload>.png`` with ``--diagnose``.

Numbers are shown with 3 significant digits (CSV files keep 4). Wall-clock values below
:data:`~gradkit.bench.analysis.MIN_SECONDS` are greyed and marked as timing noise.

Determinism: the report contains no timestamps. All content is a function of the database;
columns (and HTML cells) whose name contains ``seconds`` are wall-clock measurements and differ
between two runs of the same command, everything else (step-based times, scores, intervals,
metrics, the trial set) is identical for identical trial outcomes. PNG bytes are not compared.
"""

from __future__ import annotations

import csv
import html
import math
from pathlib import Path
from typing import Any

from gradkit.bench import analysis, plots
from gradkit.bench.analysis import MIN_SECONDS, Analysis, Standing, Table, fmt
from gradkit.bench.analysis import fmt_interval as _ci
from gradkit.bench.store import Store
from gradkit.errors import UsageError

CSV_TABLES = {
    "leaderboard": analysis.leaderboard,
    "time_to_target": analysis.time_to_target,
    "final_metrics": analysis.final_metrics,
    "trials": analysis.trials_table,
}


def pick_suite(store: Store, suite: str | None) -> tuple[str, str]:
    """The (suite, version) to report: the named suite's latest version, or the latest run."""
    runs = store.suites()
    if suite is not None:
        runs = [r for r in runs if r[0] == suite]
        if not runs:
            names = sorted({r[0] for r in store.suites()})
            raise UsageError(f"suite {suite!r} is not in the database; present: "
                             f"{', '.join(names) or 'none'}")
    if not runs:
        raise UsageError("the database has no benchmark runs yet")
    return runs[-1]


def write_csv(table: Table, path: Path) -> None:
    headers, rows = table
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(headers)
        for row in rows:
            writer.writerow(["" if v is None else v for v in row])


def text_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers, *[[fmt(v) for v in row] for row in rows]]
    widths = [max(len(r[k]) for r in cells) for k in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------- shared cell contents
def _speedup_cell(s: Standing, basis: str, n: int) -> tuple[str, str]:
    """(value with interval, note) of a geometric-mean speedup."""
    value = getattr(s, f"speedup_{basis}")
    if math.isnan(value):
        return "–", ""
    missed = getattr(s, f"missed_{basis}")
    return (f"{fmt(value)}×{_ci(*getattr(s, f'speedup_{basis}_ci'))}",
            f"missed {missed} of {n}" if missed else "")


def _leader_rows(a: Analysis) -> tuple[list[str], list[list[tuple[str, str]]]]:
    """Leaderboard cells as (text, small note) pairs, shared by HTML and text."""
    headers = ["rank", "optimizer", "score (steps)", "targets reached", "fastest on",
               "speedup vs torch.optim (steps)", "score (wall-clock)",
               "speedup (wall-clock)", "failed / diverged trials"]
    n, n_timed = len(a.workloads), int(a.timed().sum())
    rows = []
    for s in a.standings:
        secs = ((f"{fmt(s.score_seconds)}{_ci(*s.score_seconds_ci)}", ""),
                _speedup_cell(s, "seconds", n_timed)) if n_timed else (("–", ""), ("–", ""))
        rows.append([(str(s.rank), ""), (s.optimizer + (" †" if s.baseline else ""), ""),
                     (f"{fmt(s.score_steps)}{_ci(*s.score_steps_ci)}", ""),
                     (f"{s.reached}/{n}", ""), (str(s.fastest), ""),
                     _speedup_cell(s, "steps", n), *secs,
                     (f"{s.failed_trials} / {s.diverged_trials}", "")])
    return headers, rows


def _timed_note(a: Analysis) -> str:
    timed = a.timed()
    if timed.all():
        return ""
    left = [w["name"] for w, t in zip(a.workloads, timed) if not t]
    if not timed.any():
        return (f"Wall-clock is not scored: on every workload the fastest time to target is "
                f"below {MIN_SECONDS:g} s, which is timing noise; compare steps.")
    return (f"Wall-clock scores and speedups use the {int(timed.sum())} of {len(timed)} "
            f"workloads whose fastest time to target is at least {MIN_SECONDS:g} s; left out "
            f"as timing noise: {', '.join(left)}.")


def pivot_time_to_target(a: Analysis, basis: str = "steps"
                         ) -> tuple[list[str], list[list[tuple[str, str, bool]]]]:
    """Optimizer rows × workload columns: (``median [min–max]``, ``×speedup``, noise flag)."""
    headers, rows = analysis.time_to_target(a)
    h = {name: k for k, name in enumerate(headers)}
    cell: dict[tuple[str, str], tuple[str, str, bool]] = {}
    for r in rows:
        med, lo, hi = r[h[f"median_{basis}"]], r[h[f"min_{basis}"]], r[h[f"max_{basis}"]]
        text = fmt(med) if fmt(lo) == fmt(hi) else f"{fmt(med)} [{fmt(lo)}–{fmt(hi)}]"
        speed = r[h[f"speedup_{basis}"]]
        note = "" if speed is None or math.isnan(speed) or speed == 0 else f"×{fmt(speed)}"
        noise = basis == "seconds" and math.isfinite(med) and med < MIN_SECONDS
        cell[r[0], r[1]] = (text, note, noise)
    out = [[(o + (" †" if b else ""), "", False),
            *[cell.get((w["name"], o), ("–", "", False)) for w in a.workloads]]
           for o, b in zip(a.optimizers, a.baselines)]
    return ["optimizer", *[w["name"] for w in a.workloads]], out


def selected_pivot(a: Analysis) -> tuple[list[str], list[list[tuple[str, str]]]]:
    """Optimizer rows × workload columns: (median test metric, selected hyperparameters)."""
    out = []
    for o, b in zip(a.optimizers, a.baselines):
        row = [(o + (" †" if b else ""), "")]
        for w in a.workloads:
            s = a.studies.get((w["name"], o))
            if s is None or s.selected is None:
                row.append(("–", ""))
                continue
            test = s.metric("final_test_metric")[0]
            hp = s.selected.hparams
            shown = {k: v for k, v in hp.items() if isinstance(v, int | float)
                     and not isinstance(v, bool)}
            note = " ".join(f"{k}={fmt(v)}" for k, v in sorted(shown.items()))
            row.append((fmt(test), note if "lr" not in hp else f"lr={fmt(hp['lr'])}"))
        out.append(row)
    return ["optimizer", *[f"{w['name']} ({w['metric']})" for w in a.workloads]], out


def summary_text(a: Analysis) -> str:
    """The plain-text summary printed at the end of ``gradkit bench``."""
    parts = [f"suite {a.suite} (version {a.version}): {len(a.workloads)} workloads, "
             f"{len(a.optimizers)} optimizers, {len(a.trials)} trials", "",
             analysis.verdict(a)]
    parts += [f"note: {n}" for n in a.notes]
    headers, rows = _leader_rows(a)
    parts += ["", "Leaderboard (score: area under the performance profile, τ ≤ 4, 1 = fastest "
              "everywhere; speedup: geometric mean vs the best torch.optim baseline per "
              "workload, a miss counted as the whole budget; [95 % bootstrap interval]; "
              "† torch.optim):",
              text_table(headers, [[f"{t} ({note})" if note else t for t, note in r]
                                   for r in rows])]
    if _timed_note(a):
        parts.append(_timed_note(a))
    for basis in ("steps", "seconds"):
        headers, rows = pivot_time_to_target(a, basis)
        flag = f"; * below {MIN_SECONDS:g} s: timing noise" if basis == "seconds" else ""
        parts += ["", f"Time to validation target ({basis}; median [min–max] over seeds, "
                  f"∞ = missed; ×speedup vs best torch.optim{flag}):",
                  text_table(headers, [[t + ("*" if noise else "") + (f" {n}" if n else "")
                                        for t, n, noise in r] for r in rows])]
    headers, rows = selected_pivot(a)
    parts += ["", "Final test metric of the selected configuration (median over seeds):",
              text_table(headers, [[t for t, _ in r] for r in rows])]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------ HTML
def _html_table(headers: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _rich_table(headers: list[str], rows: list[list[tuple]], cls: str = "") -> str:
    """Cells are (text, note[, noise]) tuples: the note goes on a second, smaller line."""
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for text, note, *flag in row:
            attr = " class='noise' title='below 0.1 s: timing noise'" if flag and flag[0] else ""
            small = f"<br><small>{e(note)}</small>" if note else ""
            cells.append(f"<td{attr}>{e(text)}{small}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<table class='{cls}'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:1.5em auto;padding:0 1em;
color:#222}
table{border-collapse:collapse;margin:0.5em 0 1em;font-size:0.8em;max-width:100%}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right;white-space:nowrap}
th{background:#f3f3f3;white-space:normal;max-width:9em;vertical-align:bottom}
td:first-child,th:first-child,.leaderboard td:nth-child(2){text-align:left}
td small{color:#666}table.text td{text-align:left;white-space:normal}
td.noise{color:#999;font-style:italic}img{max-width:100%}
.verdict{font-size:1.1em;background:#eef5ff;border-left:4px solid #3b7dd8;padding:8px 12px}
.note{background:#fff6d6;padding:4px 8px;margin:2px 0}
dl{font-size:0.9em;display:grid;grid-template-columns:max-content 1fr;gap:3px 14px}
dt{font-weight:600}dd{margin:0}.foot{font-size:0.85em;color:#555}"""

GLOSSARY = (
    ("time to target", "training steps (or timed training seconds; evaluation is untimed) "
     "until the validation metric first reaches the workload's target, checked at every "
     "evaluation; median over the seeds of the selected configuration; ∞ if missed or "
     "diverged."),
    ("τ (tau)", "a tolerance: how many times the fastest optimizer's time on a workload "
     "still counts. The performance ratio of an optimizer on a workload is its time divided "
     "by the fastest time there."),
    ("performance profile", "ρ(τ), the fraction of workloads on which an optimizer's "
     "performance ratio is at most τ (plotted for τ from 1 to 4)."),
    ("score", "the area under ρ(τ) for τ from 1 to 4, scaled to [0, 1]: 1 = fastest on every "
     "workload, 0 = never within 4× of the fastest (AlgoPerf's benchmark score)."),
    ("speedup", "on one workload, the time of the best torch.optim baseline on that workload "
     "(the fastest of the torch.optim classes in the run, tuned with the same budget) divided "
     "by the optimizer's time; above 1 is faster. The leaderboard gives the geometric mean "
     "over workloads, where a missed target counts as the whole budget (AlgoPerf's rule), so "
     "missing a target never raises it; 'missed k of n' says how often that happened."),
    ("95 % interval", "percentile interval of a seeded bootstrap (1000 replicates) that "
     "resamples the seed runs of every selected configuration; tuning is not resampled."),
    ("rank", "optimizers sorted by step score share the rank of the group above unless "
     "they are clearly worse than its best member: a lower score at 3 significant digits and "
     "a 95 % interval entirely below. Equal scores and overlapping intervals share a rank."),
    ("† / grey", "† marks a torch.optim baseline; grey italic wall-clock cells are below "
     f"{MIN_SECONDS:g} s, which is timing noise."),
)


def diagnostics_html(a: Analysis, readings: analysis.Readings) -> str:
    """The ``--diagnose`` section: what it shows, and the diverged configurations' readings."""
    if not any(readings.values()):
        return ""
    parts = ["<h2>Diagnostics (<code>--diagnose</code>)</h2>",
             "<p class='foot'>Instrument readings at the evaluation points (outside the timed "
             "steps) of the selected configurations and of every diverged configuration; the "
             "figures are with each workload below. Sharpness is compared with 2/η, the "
             "stability threshold of gradient descent at learning rate η (momentum and "
             "adaptive methods have other thresholds): a ratio above 1 means the step size "
             "is past the edge of stability on the sharpest direction.</p>"]
    headers, rows = analysis.divergence_table(a, readings)
    if rows:
        parts += ["<h3>Diverged configurations: last readings before they stopped</h3>",
                  _html_table(headers, rows)]
    return "\n".join(parts)


def render_html(a: Analysis, figures: dict[str, str],
                readings: analysis.Readings | None = None) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>gradkit bench: "
             f"{e(a.suite)}</title><style>{_CSS}</style></head><body>",
             f"<h1>gradkit bench — suite <code>{e(a.suite)}</code> (version {e(a.version)})</h1>",
             f"<p class='verdict'>{e(analysis.verdict(a))}</p>"]
    parts += [f"<div class='note'>note: {e(n)}</div>" for n in a.notes]
    parts += ["<h2>Leaderboard</h2>", _rich_table(*_leader_rows(a), cls="leaderboard")]
    foot = ["† torch.optim baseline. [ ] 95 % bootstrap interval. Scores and speedups in "
            "steps are reproducible; wall-clock ones vary between runs."]
    if _timed_note(a):
        foot.append(_timed_note(a))
    parts.append(f"<p class='foot'>{e(' '.join(foot))}</p>")
    parts += ["<h2>Glossary</h2><dl>",
              *[f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in GLOSSARY], "</dl>"]
    parts.append(
        "<p class='foot'>Protocol: each optimizer gets the same budget — its defaults plus "
        "quasi-random (scrambled Halton) configurations from its declared log-uniform search "
        "space, selected on validation (fewest steps to the validation target, then best "
        "final validation metric); the selected configuration is rerun with several seeds "
        "and its test metric reported. Misses and divergences count as infinite time to "
        "target.</p>")
    if a.environment:
        parts.append(f"<p class='foot'>Latest run: {e(a.environment)}.</p>")
    if "profile" in figures:
        parts += ["<h2>Performance profile</h2>",
                  f"<img src='{figures['profile']}' alt='performance profile'>"]
    for basis in ("steps", "seconds"):
        parts += [f"<h2>Time to validation target ({basis})</h2>",
                  "<p class='foot'>median [min–max] over seeds; ×speedup vs the best "
                  "torch.optim baseline of the workload</p>",
                  _rich_table(*pivot_time_to_target(a, basis))]
    parts += ["<h2>Selected configurations: final test metric</h2>",
              "<p class='foot'>median over seeds; the selected hyperparameters below</p>",
              _rich_table(*selected_pivot(a))]
    if readings:
        parts.append(diagnostics_html(a, readings))
    studies = sorted({(s.optimizer, s.space) for s in a.studies.values()})
    parts += ["<h2>Declared search spaces</h2>",
              _html_table(["optimizer", "search space"], [list(s) for s in studies], "text")]
    for w in a.workloads:
        parts += [f"<h2>Workload <code>{e(w['name'])}</code></h2>",
                  f"<p>{e(w.get('description', ''))}. Target: validation {e(w['metric'])} "
                  f"{'≥' if w['higher_is_better'] else '≤'} {fmt(w['target'])}; budget "
                  f"{w['steps']} steps, batch {w['batch_size']}, evaluation every "
                  f"{w['eval_every']} steps.</p>"]
        for kind in ("curves", "lr", "diagnostics"):
            src = figures.get(f"{kind}_{w['name']}")
            if src:
                parts.append(f"<img src='{src}' alt='{kind} {e(w['name'])}'>")
    failed = [r for r in a.trials if r.status != "ok"]
    if failed:
        parts += ["<h2>Failed and diverged trials</h2>",
                  _html_table(["workload", "optimizer", "trial", "seed", "status", "message"],
                              [[r.workload, r.optimizer, r.trial_index, r.seed,
                                r.status, r.error or r.divergence] for r in failed], "text")]
    parts.append("<p>CSV: " + ", ".join(f"<a href='{n}.csv'>{n}.csv</a>" for n in CSV_TABLES)
                 + "</p></body></html>")
    return "\n".join(parts)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_report(store: Store, out: Path, suite: str | None = None) -> tuple[Path, Analysis]:
    """Write the report of ``suite`` (default: latest run) into ``out``; return index path."""
    name, version = pick_suite(store, suite)
    a = analysis.analyze(store, name, version)
    out.mkdir(parents=True, exist_ok=True)
    for stem, build in CSV_TABLES.items():
        write_csv(build(a), out / f"{stem}.csv")
    figures: dict[str, str] = {}
    if a.optimizers and a.workloads:
        plots.performance_profile(a, out / "profile.png")
        figures["profile"] = "profile.png"
        keys = [r.key for s in a.studies.values() for r in s.final]
        curves = store.curves(keys)
        for w in a.workloads:
            safe = _safe(w["name"])
            plots.workload_curves(a, w, curves, out / f"curves_{safe}.png")
            plots.lr_sensitivity(a, w, out / f"lr_{safe}.png")
            figures[f"curves_{w['name']}"] = f"curves_{safe}.png"
            figures[f"lr_{w['name']}"] = f"lr_{safe}.png"
    readings = store.diagnostics([r.key for _, r in analysis.diagnosed_trials(a)])
    if any(readings.values()):
        write_csv(analysis.diagnostics_table(a, readings), out / "diagnostics.csv")
        for w in a.workloads:
            target = out / f"diagnostics_{_safe(w['name'])}.png"
            if plots.diagnostics(a, w, readings, target):
                figures[f"diagnostics_{w['name']}"] = target.name
    index = out / "index.html"
    index.write_text(render_html(a, figures, readings), encoding="utf-8")
    return index, a

