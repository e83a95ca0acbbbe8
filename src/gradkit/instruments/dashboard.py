"""PNG dashboard of a recorded run: one panel per quantity group that has data (loss,
gradient norm, sharpness with its threshold line, preconditioned sharpness, Hessian trace
with 2/η, coherence, noise scale, update/weight ratio, logits, neural collapse)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradkit.errors import UsageError, require_extra

from .records import Series, load_run

# (title, [(series, label, style)], log-scale y). Style "thr" draws a dashed threshold line.
PANELS: list[tuple[str, list[tuple[str, str, str]], bool]] = [
    ("loss", [("loss", "training loss", "-")], True),
    ("gradient norm", [("grad_norm", "‖g‖", "-")], True),
    ("sharpness", [("sharpness", "λ_max(H)", "o-"),
                   ("sharpness_threshold", "stability threshold", "thr")], False),
    ("Adam preconditioned sharpness", [("precond_sharpness", "λ_max(P^-1/2 H P^-1/2)", "o-"),
                                       ("precond_threshold", "(2+2β₁)/((1−β₁)η)", "thr")],
     False),
    ("Hessian trace", [("hessian_trace", "tr H (Hutchinson)", "o-"),
                       ("trace_threshold", "2/η", "thr")], False),
    ("coherence", [("m_coherence", "m-coherence", "o-")], False),
    ("gradient noise scale", [("noise_scale", "B_simple (EMA)", "o-"),
                              ("noise_scale_raw", "B_simple (raw)", ".")], False),
    ("gradient SNR", [("grad_snr", "mean GSNR", "o-")], True),
    ("update / weight", [("update_ratio", "‖Δθ‖/‖θ‖", "-")], True),
    ("logits", [("max_abs_logit", "max |z|", "-"), ("softmax_collapse", "SC fraction", "-")],
     False),
    ("neural collapse", [("nc1", "NC1", "o-"), ("nc2_equinorm_features", "NC2 equinorm", "o-"),
                         ("nc2_equiangular_features", "NC2 equiangular", "o-"),
                         ("nc3", "NC3", "o-"), ("nc4", "NC4", "o-")], True),
]


def _points(series: Series, name: str) -> tuple[list[int], list[float]]:
    steps, values = series.get(name, ([], []))
    pts = [(s, float(v)) for s, v in zip(steps, values) if isinstance(v, int | float)]
    return [s for s, _ in pts], [v for _, v in pts]


def plot_run(run: str | Path, out_png: str | Path, *, title: str | None = None) -> Path:
    """Draw the dashboard of ``run`` to ``out_png`` and return its path."""
    series = load_run(run)
    panels = [p for p in PANELS if any(_points(series, n)[0] for n, _, s in p[1] if s != "thr")]
    if not panels:
        raise UsageError(f"run '{run}' has no plottable records")
    matplotlib = require_extra("matplotlib", "plot", "gradkit plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 2 if len(panels) > 1 else 1
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 3 * nrows), squeeze=False)
    for ax, (name, lines, log) in zip(axes.flat, panels):
        _draw(ax, series, lines, log)
        ax.set_title(name)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title or str(run))
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _draw(ax: Any, series: Series, lines: list[tuple[str, str, str]], log: bool) -> None:
    positive = True
    for name, label, style in lines:
        steps, values = _points(series, name)
        if not steps:
            continue
        positive &= all(v > 0 for v in values)
        if style == "thr":
            ax.step(steps, values, where="post", linestyle="--", color="k", label=label)
        else:
            ax.plot(steps, values, style, markersize=3, label=label)
    if log and positive:
        ax.set_yscale("log")
    ax.legend(fontsize=8)


plot = plot_run
