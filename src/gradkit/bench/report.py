"""Static report of a results database: ``index.html`` + PNG figures + CSV files.

Files written to the output directory:

* ``index.html`` — protocol, notes, leaderboard and score table, performance profile,
  time-to-target and final-metric tables, per-workload curves and LR-sensitivity plots,
  failed trials.
* ``leaderboard.csv``, ``time_to_target.csv``, ``final_metrics.csv``, ``trials.csv``.
* ``profile.png``, ``curves_<workload>.png``, ``lr_<workload>.png``.

Determinism: the report contains no timestamps. All content is a function of the database;
columns (and HTML cells) whose name contains ``seconds`` are wall-clock measurements and differ
between two runs of the same command, everything else (step-based times, scores, metrics, the
trial set) is identical for identical trial outcomes. PNG bytes are not compared.
"""

from __future__ import annotations

import csv
import html
import math
from pathlib import Path
from typing import Any

from gradkit.bench import analysis, plots
from gradkit.bench.analysis import Analysis, Table
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


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        if value == int(value) and abs(value) < 1e9:
            return str(int(value))
        return f"{value:.4g}"
    return str(value)


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


def pivot_time_to_target(a: Analysis, basis: str = "steps") -> tuple[list[str], list[list]]:
    """Workload rows × optimizer columns: ``median [min–max] (×speedup)``."""
    headers, rows = analysis.time_to_target(a)
    h = {name: k for k, name in enumerate(headers)}
    cell: dict[tuple[str, str], str] = {}
    for r in rows:
        med, lo, hi = r[h[f"median_{basis}"]], r[h[f"min_{basis}"]], r[h[f"max_{basis}"]]
        text = fmt(med) if lo == hi else f"{fmt(med)} [{fmt(lo)}–{fmt(hi)}]"
        speed = r[h[f"speedup_{basis}"]]
        if speed is not None and not (isinstance(speed, float) and math.isnan(speed)):
            text += f" (×{fmt(speed)})"
        cell[r[0], r[1]] = text
    out = [[w["name"], *[cell.get((w["name"], o), "–") for o in a.optimizers]]
           for w in a.workloads]
    return [f"workload \\ {basis} to target", *a.optimizers], out


def summary_text(a: Analysis) -> str:
    """The plain-text summary printed at the end of ``gradkit bench``."""
    headers, rows = analysis.leaderboard(a)
    keep = ["rank", "optimizer", "score_steps", "score_seconds", "targets_reached",
            "geomean_speedup_steps", "geomean_speedup_seconds", "failed_trials",
            "diverged_trials"]
    idx = [headers.index(k) for k in keep]
    parts = [f"suite {a.suite} (version {a.version}): {len(a.workloads)} workloads, "
             f"{len(a.optimizers)} optimizers, {len(a.trials)} trials"]
    parts += [f"note: {n}" for n in a.notes]
    parts += ["", "Leaderboard (score = normalised area under the performance profile, "
              "τ ≤ 4; speedups vs best torch.optim baseline):",
              text_table(keep, [[r[k] for k in idx] for r in rows])]
    for basis in ("steps", "seconds"):
        parts += ["", f"Time to validation target ({basis}; median [min–max] over seeds, "
                  "∞ = missed; ×speedup vs best torch.optim):",
                  text_table(*pivot_time_to_target(a, basis))]
    fh, frows = analysis.final_metrics(a)
    g = {name: k for k, name in enumerate(fh)}
    test = {(r[0], r[1]): r[g["median_test"]] for r in frows}
    parts += ["", "Final test metric of the selected configuration (median over seeds):",
              text_table(["workload (metric)", *a.optimizers],
                         [[f"{w['name']} ({w['metric']})",
                           *[test.get((w["name"], o)) for o in a.optimizers]]
                          for w in a.workloads])]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------ HTML
def _html_table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.85em}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}img{max-width:100%}
.note{background:#fff6d6;padding:4px 8px;margin:2px 0}"""


def render_html(a: Analysis, figures: dict[str, str]) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>gradkit bench: "
             f"{e(a.suite)}</title><style>{_CSS}</style></head><body>",
             f"<h1>gradkit bench — suite <code>{e(a.suite)}</code> (version {e(a.version)})</h1>",
             "<p>Protocol: each optimizer gets the same budget — its defaults plus quasi-random "
             "(scrambled Halton) configurations from its declared log-uniform search space, "
             "selected on validation (fewest steps to the validation target, then best final "
             "validation metric); the selected configuration is rerun with several seeds and "
             "its test metric reported. Misses and divergences count as infinite time. Columns "
             "with <em>seconds</em> are wall-clock (training steps only; evaluation untimed) "
             "and vary between runs; everything else is step-based and reproducible.</p>"]
    if a.environment:
        parts.append(f"<p>Latest run: {e(a.environment)}.</p>")
    parts += [f"<div class='note'>note: {e(n)}</div>" for n in a.notes]
    parts += ["<h2>Leaderboard and scores</h2>", _html_table(*analysis.leaderboard(a))]
    if "profile" in figures:
        parts.append(f"<img src='{figures['profile']}' alt='performance profile'>")
    for basis in ("steps", "seconds"):
        parts += [f"<h2>Time to validation target ({basis})</h2>",
                  _html_table(*pivot_time_to_target(a, basis))]
    parts += ["<h2>Final metrics of the selected configurations</h2>",
              _html_table(*analysis.final_metrics(a))]
    studies = sorted({(s.optimizer, s.space) for s in a.studies.values()})
    parts += ["<h2>Declared search spaces</h2>",
              _html_table(["optimizer", "search space"], [list(s) for s in studies])]
    for w in a.workloads:
        parts += [f"<h2>Workload <code>{e(w['name'])}</code></h2>",
                  f"<p>{e(w.get('description', ''))}. Target: validation {e(w['metric'])} "
                  f"{'≥' if w['higher_is_better'] else '≤'} {fmt(w['target'])}; budget "
                  f"{w['steps']} steps, batch {w['batch_size']}, evaluation every "
                  f"{w['eval_every']} steps.</p>"]
        for kind in ("curves", "lr"):
            src = figures.get(f"{kind}_{w['name']}")
            if src:
                parts.append(f"<img src='{src}' alt='{kind} {e(w['name'])}'>")
    failed = [r for r in a.trials if r.status != "ok"]
    if failed:
        parts += ["<h2>Failed and diverged trials</h2>",
                  _html_table(["workload", "optimizer", "trial", "seed", "status", "message"],
                              [[r.workload, r.optimizer, r.trial_index, r.seed,
                                r.status, r.error or r.divergence] for r in failed])]
    parts.append("<p>CSV: " + ", ".join(f"<a href='{n}.csv'>{n}.csv</a>" for n in CSV_TABLES)
                 + "</p></body></html>")
    return "\n".join(parts)


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
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in w["name"])
            plots.workload_curves(a, w, curves, out / f"curves_{safe}.png")
            plots.lr_sensitivity(a, w, out / f"lr_{safe}.png")
            figures[f"curves_{w['name']}"] = f"curves_{safe}.png"
            figures[f"lr_{w['name']}"] = f"lr_{safe}.png"
    index = out / "index.html"
    index.write_text(render_html(a, figures), encoding="utf-8")
    return index, a
