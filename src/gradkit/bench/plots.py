"""PNG figures of a benchmark report (matplotlib, Agg backend; no torch).

Every optimizer keeps one colour and marker in every figure (:func:`gradkit._plotting.
series_styles`: distinct for the 12 default optimizers and beyond), legends sit outside the
axes, and a configuration without a measured value (diverged, failed) is never drawn as if it
had one: it is an ``x`` (diverged) or ``+`` (failed) in a strip labelled "diverged / failed"
above the axes, one row per optimizer, at its learning rate or at the step where it stopped.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from gradkit import _plotting
from gradkit.bench import scoring
from gradkit.bench.analysis import Analysis, Readings, diagnosed_trials, edge_of_stability
from gradkit.bench.records import CurvePoint

DIVERGED, FAILED = "x", "+"


def _pyplot() -> Any:
    return _plotting.pyplot("bench", "the HTML report")


def styles(a: Analysis) -> dict[str, dict[str, Any]]:
    """Colour, marker and line style per optimizer, the same in every figure of a report."""
    return _plotting.series_styles(a.optimizers)


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    _pyplot().close(fig)


def _figure(plt: Any, ncols: int, width: float, strip: list[str]) -> tuple[Any, list, list]:
    """Main axes in a row; if ``strip`` names optimizers, a strip above each main axes with
    one labelled row per such optimizer, for its runs that have no measured value."""
    if not strip:
        fig, axes = plt.subplots(1, ncols, figsize=(width, 3.8), squeeze=False)
        return fig, list(axes[0]), []
    top_h = 0.2 + 0.16 * len(strip)
    fig, axes = plt.subplots(2, ncols, figsize=(width, 3.8 + top_h), squeeze=False,
                             gridspec_kw={"height_ratios": [top_h, 3.8], "hspace": 0.06})
    for top, main in zip(axes[0], axes[1]):
        top.sharex(main)
        top.tick_params(labelbottom=False, bottom=False, labelsize=7)
        top.set_yticks(range(len(strip)), strip)
        top.set_ylim(len(strip) - 0.5, -0.5)
        top.set_ylabel("diverged (x)\nfailed (+)", fontsize=7)
        top.grid(alpha=0.3, axis="x")
    return fig, list(axes[1]), list(axes[0])


def _strip_marks(strip: Any, row: int, xs: list[float], marker: str, color: Any) -> None:
    """Marks in the strip for runs that have no measured value."""
    if xs:
        strip.plot(xs, [row] * len(xs), marker, color=color, ms=7, mew=2, ls="none")


def _strip_legend(handles: list, labels: list[str], failed: bool) -> None:
    from matplotlib.lines import Line2D

    handles.append(Line2D([], [], marker=DIVERGED, color="k", ls="none", ms=8, mew=2))
    labels.append("diverged (strip above)")
    if failed:
        handles.append(Line2D([], [], marker=FAILED, color="k", ls="none", ms=8, mew=2))
        labels.append("failed (strip above)")


def _title(main: Any, strips: list, k: int, text: str) -> None:
    (strips[k] if strips else main).set_title(text, fontsize=10)


def performance_profile(a: Analysis, path: Path) -> None:
    """ρ(τ) in steps and in wall-clock seconds (the latter on the timed workloads only)."""
    plt = _pyplot()
    sty = styles(a)
    taus = np.linspace(1.0, scoring.TAU_MAX, 301)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    timed = a.timed()
    for ax, basis in zip(axes, ("steps", "seconds")):
        times = a.times(basis)
        if basis == "seconds":
            times = times[timed]
        title = f"time = {basis}"
        if basis == "seconds" and not timed.all():
            title += f" ({int(timed.sum())} of {len(timed)} workloads ≥ 0.1 s)"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("τ (time to target / best time)")
        ax.set_xlim(1, scoring.TAU_MAX)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if times.shape[0] == 0:
            ax.text(0.5, 0.5, "no workload timed above 0.1 s", ha="center",
                    transform=ax.transAxes)
            continue
        ratios = scoring.performance_ratios(times)
        rho = scoring.performance_profile(ratios, taus)
        for j, o in enumerate(a.optimizers):
            ax.plot(taus, rho[j], drawstyle="steps-post", color=sty[o]["color"],
                    ls=sty[o]["ls"], marker=sty[o]["marker"], markevery=(j * 7 % 60, 60),
                    ms=5, lw=1.8, label=o)
    axes[0].set_ylabel("ρ(τ): fraction of workloads")
    _plotting.legend_outside(axes[1])
    _save(fig, path)


def _stack(curves: list[list[CurvePoint]], column: str) -> tuple[np.ndarray, np.ndarray]:
    steps = sorted({point.step for c in curves for point in c})
    index = {s: k for k, s in enumerate(steps)}
    mat = np.full((len(curves), len(steps)), np.nan)
    for i, c in enumerate(curves):
        for point in c:
            value = getattr(point, column)
            if value is not None:
                mat[i, index[point.step]] = value
    return np.array(steps, dtype=float), mat


def _strip_rows(a: Analysis, bad: list) -> dict[str, int]:
    """Row of each optimizer that has runs without a value, in the report's order."""
    names = {r.optimizer for r in bad}
    return {o: k for k, o in enumerate(o for o in a.optimizers if o in names)}


def _stopped(rows: list, statuses: tuple[str, ...]) -> list:
    return [r for r in rows if r.status in statuses]


def workload_curves(a: Analysis, workload: dict[str, Any],
                    curves: dict[str, list[CurvePoint]], path: Path) -> None:
    """Validation metric and training loss vs step: median over seeds, min–max band.

    Seeds that diverged or failed are marked in a strip above the axes at the step where
    they stopped.
    """
    plt = _pyplot()
    sty = styles(a)
    studies = [(o, a.studies.get((workload["name"], o))) for o in a.optimizers]
    studies = [(o, s) for o, s in studies if s is not None and s.final]
    bad = [r for _, s in studies for r in s.final if r.status != "ok"]
    rows_of = _strip_rows(a, bad)
    fig, axes, strips = _figure(plt, 2, 10, list(rows_of))
    measured: list[list[float]] = [[], []]
    for o, study in studies:
        runs = [curves[r.key] for r in study.final if curves.get(r.key)]
        for k, (ax, column) in enumerate(zip(axes, ("val_metric", "train_loss"))):
            if runs:
                x, mat = _stack(runs, column)
                with warnings.catch_warnings():  # all-NaN columns after a divergence
                    warnings.simplefilter("ignore", RuntimeWarning)
                    med = np.nanmedian(mat, 0)
                    lo, hi = np.nanmin(mat, 0), np.nanmax(mat, 0)
                ax.plot(x, med, color=sty[o]["color"], ls=sty[o]["ls"], lw=1.6,
                        marker=sty[o]["marker"], markevery=max(1, len(x) // 6), ms=4, label=o)
                ax.fill_between(x, lo, hi, color=sty[o]["color"], alpha=0.15, lw=0)
                measured[k] += [v for v in mat.ravel() if np.isfinite(v)]
            if strips:
                for statuses, marker in ((("diverged",), DIVERGED),
                                         (("failed", "crashed"), FAILED)):
                    at = [float(r.steps_done) for r in _stopped(study.final, statuses)]
                    _strip_marks(strips[k], rows_of.get(o, 0), at, marker, sty[o]["color"])
    metric = workload["metric"]
    axes[0].axhline(workload["target"], color="k", ls="--", lw=1, label="target")
    _title(axes[0], strips, 0, f"{workload['name']}: validation {metric} "
           "(median over seeds, band min–max)")
    axes[0].set_ylabel(metric)
    if not workload["higher_is_better"]:
        _log_if_positive(axes[0], measured[0])
    _title(axes[1], strips, 1, f"{workload['name']}: training loss (mean since last eval)")
    axes[1].set_ylabel("training loss")
    _log_if_positive(axes[1], measured[1])
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if bad:
        _strip_legend(handles, labels, any(r.status != "diverged" for r in bad))
    _plotting.legend_outside(axes[1], handles, labels)
    _save(fig, path)


def lr_sensitivity(a: Analysis, workload: dict[str, Any], path: Path) -> None:
    """Final validation metric of every tuning trial against its learning rate.

    Configurations that diverged or failed have no final metric: they are marked in a strip
    above the axes, one row per optimizer, never drawn at a value.
    """
    plt = _pyplot()
    sty = styles(a)
    studies = [(o, a.studies.get((workload["name"], o))) for o in a.optimizers]
    studies = [(o, s) for o, s in studies if s is not None and s.tune]
    bad = [r for _, s in studies for r in s.tune if r.status != "ok" and "lr" in r.hparams]
    rows_of = _strip_rows(a, bad)
    fig, axes, strips = _figure(plt, 1, 7, list(rows_of))
    ax = axes[0]
    measured: list[float] = []
    for o, study in studies:
        rows = sorted((r for r in study.tune if "lr" in r.hparams),
                      key=lambda r: r.hparams["lr"])
        ok = [r for r in rows if r.status == "ok" and r.final_val_metric is not None]
        ax.plot([r.hparams["lr"] for r in ok], [r.final_val_metric for r in ok],
                color=sty[o]["color"], ls=sty[o]["ls"], marker=sty[o]["marker"], label=o, ms=5)
        measured += [r.final_val_metric for r in ok]
        if strips:
            for statuses, marker in ((("diverged",), DIVERGED), (("failed", "crashed"), FAILED)):
                _strip_marks(strips[0], rows_of.get(o, 0),
                             [r.hparams["lr"] for r in _stopped(rows, statuses)], marker,
                             sty[o]["color"])
        sel = study.selected
        if sel is not None and "lr" in sel.hparams and sel.final_val_metric is not None \
                and sel.status == "ok":
            ax.plot(sel.hparams["lr"], sel.final_val_metric, "o", mfc="none", mec="k", ms=11)
    ax.axhline(workload["target"], color="k", ls="--", lw=1, label="target")
    ax.set_xscale("log")
    if not workload["higher_is_better"]:
        _log_if_positive(ax, measured)
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"final validation {workload['metric']}")
    _title(ax, strips, 0, f"{workload['name']}: LR sensitivity of the tuning trials "
           "(ring = selected)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if bad:
        _strip_legend(handles, labels, any(r.status != "diverged" for r in bad))
    _plotting.legend_outside(ax, handles, labels)
    _save(fig, path)


def _diagnostic_series(r: Any, name: str, readings: Readings) -> list[tuple[int, float]]:
    """(step, value) readings of one trial; sharpness as ``sharpness / (2/η)``."""
    pts = [(d.step, d.value) for d in readings.get(r.key, []) if d.name == name
           and d.value is not None]
    if name == "sharpness":
        pts = [(t, edge_of_stability(v, r.hparams.get("lr"))) for t, v in pts]
    return [(t, v) for t, v in pts if v is not None]


def diagnostics(a: Analysis, workload: dict[str, Any], readings: Readings,
                path: Path) -> bool:
    """One panel per ``--diagnose`` quantity against step (False, nothing drawn, if none).

    Solid: the selected configuration (median over its seeds). Thin dashed, ending in an
    ``x``: every diverged configuration, up to its last reading before it stopped. Sharpness
    is drawn as ``sharpness / (2/η)`` with η the trial's learning rate, so gradient descent's
    stability threshold is the line at 1 for every optimizer.
    """
    from matplotlib.lines import Line2D

    trials = [(role, r) for role, r in diagnosed_trials(a)
              if r.workload == workload["name"] and readings.get(r.key)]
    names = sorted({d.name for _, r in trials for d in readings[r.key]})
    if not names:
        return False
    plt = _pyplot()
    sty = styles(a)
    ncols = min(len(names), 2)
    nrows = (len(names) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.2 * nrows), squeeze=False,
                             layout="constrained")
    legend: dict[str, Any] = {}
    for ax, name in zip(axes.flat, names):
        measured: list[float] = []
        for o in a.optimizers:
            chosen = [_diagnostic_series(r, name, readings) for role, r in trials
                      if role == "selected" and r.optimizer == o]
            chosen = [c for c in chosen if c]
            if chosen:
                steps = sorted({t for c in chosen for t, _ in c})
                med = [float(np.median([v for c in chosen for t, v in c if t == step]))
                       for step in steps]
                legend[o] = ax.plot(steps, med, color=sty[o]["color"], ls=sty[o]["ls"],
                                    marker=sty[o]["marker"], markevery=max(1, len(steps) // 6),
                                    ms=4, lw=1.5)[0]
                measured += med
            for role, r in trials:
                pts = _diagnostic_series(r, name, readings)
                if role == "diverged" and r.optimizer == o and pts:
                    ax.plot([t for t, _ in pts], [v for _, v in pts], color=sty[o]["color"],
                            ls="--", lw=0.8)
                    ax.plot(*pts[-1], DIVERGED, color=sty[o]["color"], ms=8, mew=2)
                    measured += [v for _, v in pts]
        if name == "sharpness":
            legend["2/η (gradient descent's threshold)"] = ax.axhline(1.0, color="k", ls=":",
                                                                        lw=1)
            ax.set_ylabel("sharpness / (2/η)")
        else:
            ax.set_ylabel(name)
        _log_scale(ax, measured)
        ax.set_title(f"{workload['name']}: {name}", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if any(role == "diverged" for role, _ in trials):
        legend["diverged configuration (x = last reading)"] = Line2D(
            [], [], color="k", ls="--", lw=0.8, marker=DIVERGED, mew=2)
    _plotting.legend_outside(axes[0, -1], list(legend.values()), list(legend))
    _save(fig, path)
    return True


def _log_scale(ax: Any, data: list[float]) -> None:
    """Log scale for positive data over a wide range, symlog for signed data with outliers
    (the noise-scale estimate can be negative and spike when the mean gradient is small)."""
    values = np.asarray([v for v in data if v is not None], dtype=float)
    values = np.abs(values[np.isfinite(values)])
    if len(values) and not np.all(np.asarray(data, dtype=float) > 0):
        typical = float(np.median(values))
        if typical > 0 and values.max() / typical > 100:
            ax.set_yscale("symlog", linthresh=typical)
        return
    _log_if_positive(ax, data)


def _log_if_positive(ax: Any, data: list[float]) -> None:
    values = np.asarray([v for v in data if v is not None], dtype=float)
    values = values[np.isfinite(values)]
    if len(values) and np.all(values > 0) and values.max() / values.min() > 20:
        ax.set_yscale("log")
