"""PNG figures of a benchmark report (matplotlib, Agg backend)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from gradkit.bench import scoring
from gradkit.bench.analysis import Analysis
from gradkit.bench.records import CurvePoint
from gradkit.errors import require_extra


def _pyplot():
    matplotlib = require_extra("matplotlib", "bench", "the HTML report")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_LINES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def styles(a: Analysis) -> dict[str, dict[str, Any]]:
    """Colour, line style and marker per optimizer (distinct even when curves coincide)."""
    cmap = _pyplot().get_cmap("tab10")
    return {o: {"color": cmap(j % 10), "ls": _LINES[j % len(_LINES)],
                "marker": _MARKERS[j % len(_MARKERS)]} for j, o in enumerate(a.optimizers)}


def performance_profile(a: Analysis, path: Path) -> None:
    plt = _pyplot()
    sty = styles(a)
    taus = np.linspace(1.0, scoring.TAU_MAX, 301)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, basis in zip(axes, ("steps", "seconds")):
        ratios = scoring.performance_ratios(a.times(basis))
        rho = scoring.performance_profile(ratios, taus)
        scores = scoring.integrated_score(ratios)
        for j, o in enumerate(a.optimizers):
            ax.step(taus, rho[j], where="post", color=sty[o]["color"], ls=sty[o]["ls"], lw=2,
                    label=f"{o} (score {scores[j]:.2f})")
        ax.set_xlabel("τ (time to target / best time)")
        ax.set_title(f"performance profile, time = {basis}")
        ax.set_xlim(1, scoring.TAU_MAX)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("ρ(τ): fraction of workloads")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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


def workload_curves(a: Analysis, workload: dict[str, Any], curves: dict[str, list[CurvePoint]],
                    path: Path) -> None:
    """Validation metric and training loss vs step: median over seeds, min–max band."""
    plt = _pyplot()
    sty = styles(a)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for o in a.optimizers:
        study = a.studies.get((workload["name"], o))
        if study is None or not study.final:
            continue
        runs = [curves[r.key] for r in study.final if curves.get(r.key)]
        if not runs:
            continue
        for ax, column in zip(axes, ("val_metric", "train_loss")):
            x, mat = _stack(runs, column)
            with warnings.catch_warnings():  # all-NaN columns after a divergence
                warnings.simplefilter("ignore", RuntimeWarning)
                med = np.nanmedian(mat, 0)
                lo, hi = np.nanmin(mat, 0), np.nanmax(mat, 0)
            bad = sum(r.status != "ok" for r in study.final)
            ax.plot(x, med, color=sty[o]["color"], ls=sty[o]["ls"], lw=1.8,
                    label=f"{o} ({len(runs)} seeds{f', {bad} diverged/failed' if bad else ''})")
            ax.fill_between(x, lo, hi, color=sty[o]["color"], alpha=0.2, lw=0)
    metric = workload["metric"]
    axes[0].axhline(workload["target"], color="k", ls="--", lw=1, label="target")
    axes[0].set_title(f"{workload['name']}: validation {metric}")
    axes[0].set_ylabel(metric)
    if not workload["higher_is_better"]:
        _log_if_positive(axes[0])
    axes[1].set_title(f"{workload['name']}: training loss (mean since last eval)")
    axes[1].set_ylabel("training loss")
    _log_if_positive(axes[1])
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def lr_sensitivity(a: Analysis, workload: dict[str, Any], path: Path) -> None:
    """Final validation metric of every tuning trial against its learning rate."""
    plt = _pyplot()
    sty = styles(a)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    finite_vals = [r.final_val_metric for r in a.trials
                   if r.workload == workload["name"] and r.final_val_metric is not None
                   and math.isfinite(r.final_val_metric)]
    worst = (min(finite_vals) if workload["higher_is_better"] else max(finite_vals)
             ) if finite_vals else 0.0
    for o in a.optimizers:
        study = a.studies.get((workload["name"], o))
        if study is None or not study.tune:
            continue
        rows = sorted((r for r in study.tune if "lr" in r.hparams),
                      key=lambda r: r.hparams["lr"])
        ok = [r for r in rows if r.final_val_metric is not None]
        bad = [r for r in rows if r.final_val_metric is None]
        ax.plot([r.hparams["lr"] for r in ok], [r.final_val_metric for r in ok],
                color=sty[o]["color"], ls=sty[o]["ls"], marker=sty[o]["marker"], label=o, ms=5)
        if bad:
            ax.plot([r.hparams["lr"] for r in bad], [worst] * len(bad), "x",
                    color=sty[o]["color"], ms=9, mew=2)
        if study.selected is not None and "lr" in study.selected.hparams and \
                study.selected.final_val_metric is not None:
            ax.plot(study.selected.hparams["lr"], study.selected.final_val_metric, "o",
                    mfc="none", mec="k", ms=11)
    ax.axhline(workload["target"], color="k", ls="--", lw=1)
    ax.set_xscale("log")
    if not workload["higher_is_better"]:
        _log_if_positive(ax)
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"final validation {workload['metric']}")
    ax.set_title(f"{workload['name']}: LR sensitivity (x = diverged/failed, ring = selected)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _log_if_positive(ax) -> None:
    lines = [line.get_ydata() for line in ax.get_lines()]
    data = np.concatenate([np.asarray(y, dtype=float).ravel() for y in lines]) if lines else []
    data = data[np.isfinite(data)] if len(data) else data
    if len(data) and np.all(data > 0) and data.max() / data.min() > 20:
        ax.set_yscale("log")

