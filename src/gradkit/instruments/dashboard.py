"""PNG dashboard of a recorded run: one panel per quantity group that has data (loss,
gradient norm, sharpness with its threshold line, preconditioned sharpness, Hessian trace
with 2/η, coherence, noise scale, update/weight ratio, logits, neural collapse).

Readable on short runs: every panel spans the run's whole step range (shared x-axis with
integer ticks), and series with few points are drawn with markers, so a quantity measured
once is a visible dot. When the loss, gradient norm or update size becomes non-finite (a
diverged run; stored as null), a red dotted line on every panel marks the first such step.
Several runs in one directory are drawn side by side, one colour per run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradkit.errors import UsageError, require_extra

from .records import Series, load_runs

# (title, [(series, label, style)], log-scale y). Style "thr" draws a dashed threshold line.
PANELS: list[tuple[str, list[tuple[str, str, str]], bool]] = [
    ("loss", [("loss", "training loss", "-")], True),
    ("gradient norm", [("grad_norm", "‖g‖", "-")], True),
    ("sharpness", [("sharpness", "λ_max(H)", "-"),
                   ("sharpness_threshold", "stability threshold", "thr")], False),
    ("Adam preconditioned sharpness", [("precond_sharpness", "λ_max(P^-1/2 H P^-1/2)", "-"),
                                       ("precond_threshold", "(2+2β₁)/((1−β₁)η)", "thr")],
     False),
    ("Hessian trace", [("hessian_trace", "tr H (Hutchinson)", "-"),
                       ("trace_threshold", "2/η", "thr")], False),
    ("coherence", [("m_coherence", "m-coherence", "-")], False),
    ("gradient noise scale", [("noise_scale", "B_simple (EMA)", "-"),
                              ("noise_scale_raw", "B_simple (raw)", ":")], False),
    ("gradient SNR", [("grad_snr", "mean GSNR", "-")], True),
    ("update / weight", [("update_ratio", "‖Δθ‖/‖θ‖", "-")], True),
    ("logits", [("max_abs_logit", "max |z|", "-"), ("softmax_collapse", "SC fraction", "-")],
     False),
    ("neural collapse", [("nc1", "NC1", "-"), ("nc2_equinorm_features", "NC2 equinorm", "-"),
                         ("nc2_equiangular_features", "NC2 equiangular", "-"),
                         ("nc3", "NC3", "-"), ("nc4", "NC4", "-")], True),
]
#: series drawn with markers when they have at most this many points
MARKER_POINTS = 60
#: the quantities whose first non-finite value marks a diverged run
DIVERGENCE_KEYS = ("loss", "grad_norm", "update_size")


def _points(series: Series, name: str) -> tuple[list[int], list[float]]:
    steps, values = series.get(name, ([], []))
    pts = [(s, float(v)) for s, v in zip(steps, values)
           if isinstance(v, int | float) and not isinstance(v, bool)]
    return [s for s, _ in pts], [v for _, v in pts]


def first_nonfinite(series: Series) -> tuple[int, str] | None:
    """``(step, name)`` of the first null (non-finite) loss, gradient norm or update size."""
    found = []
    for name in DIVERGENCE_KEYS:
        steps, values = series.get(name, ([], []))
        bad = [s for s, v in zip(steps, values) if v is None]
        if bad:
            found.append((min(bad), name))
    return min(found) if found else None


def dashboard_figure(runs: dict[str, Series], title: str = "") -> Any:
    """The dashboard of one or more runs (``{run id: series}``, see
    :func:`~gradkit.instruments.load_runs`) as a matplotlib ``Figure``.

    Args:
        runs: the series of each run to draw.
        title: the figure title.
    """
    def has_data(panel) -> bool:
        return any(_points(s, n)[0] for s in runs.values() for n, _, st in panel[1]
                   if st != "thr")

    panels = [p for p in PANELS if has_data(p)]
    if not panels:
        raise UsageError(f"run '{title}' has no plottable records")
    matplotlib = require_extra("matplotlib", "plot", "gradkit plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    all_steps = [s for series in runs.values() for steps, _ in series.values() for s in steps]
    lo, hi = min(all_steps), max(all_steps)
    pad = max(0.5, 0.02 * (hi - lo))
    ncols = 2 if len(panels) > 1 else 1
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 3 * nrows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, lines, log) in zip(axes.flat, panels):
        positive = True
        for i, (run, series) in enumerate(runs.items()):
            colour = colours[i % len(colours)] if len(runs) > 1 else None
            suffix = f" [{run}]" if len(runs) > 1 else ""
            positive &= _draw(ax, series, lines, colour, suffix, hi)
            bad = first_nonfinite(series)
            if bad is not None:
                ax.axvline(bad[0], color="red", linestyle=":", linewidth=1.5,
                           label=f"{bad[1]} non-finite from step {bad[0]}{suffix}")
        if log and positive:
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_xlim(lo - pad, hi + pad)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _draw(ax: Any, series: Series, lines: list[tuple[str, str, str]], colour: str | None,
          suffix: str, last_step: int) -> bool:
    """Draw one run's lines of a panel; returns whether every value was positive.
    Threshold lines hold their last value to ``last_step`` (so one value is a line)."""
    positive = True
    for k, (name, label, style) in enumerate(lines):
        steps, values = _points(series, name)
        if not steps:
            continue
        positive &= all(v > 0 for v in values)
        colour_k = colour if colour is None or k == 0 else None
        if style == "thr":
            if steps[-1] < last_step:
                steps, values = [*steps, last_step], [*values, values[-1]]
            ax.step(steps, values, where="post", linestyle="--", color="k",
                    label=label + suffix)
        else:
            marker = "o" if len(steps) <= MARKER_POINTS else None
            ax.plot(steps, values, linestyle=style, marker=marker, markersize=4,
                    color=colour_k, label=label + suffix)
    return positive


def plot_run(run: str | Path, out_png: str | Path, *, title: str | None = None,
             run_id: str | None = None) -> Path:
    """Draw the dashboard of a recorded run to a PNG and return its path.

    Args:
        run: a run directory or its ``metrics.jsonl`` / ``metrics.sqlite`` file.
        out_png: the PNG to write (parent directories are created).
        title: figure title (default: the run path).
        run_id: draw only this run of the files (default: every run they hold, one colour
            each).

    Example::

        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from torch import nn
        >>> from gradkit.instruments import Loss, Monitor, plot
        >>> model, loss_fn = nn.Linear(2, 2), nn.functional.cross_entropy
        >>> x, y = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
        >>> with tempfile.TemporaryDirectory() as run_dir:
        ...     with Monitor(model, loss_fn, instruments=[Loss()], log_dir=run_dir) as m:
        ...         for _ in range(3):
        ...             _ = m.step((x, y), loss=loss_fn(model(x), y))
        ...     png = plot(run_dir, Path(run_dir) / "dashboard.png")
        ...     png.read_bytes()[:4]
        b'\\x89PNG'
    """
    runs = load_runs(run)
    if run_id is not None:
        if run_id not in runs:
            raise UsageError(f"run '{run_id}' is not in '{run}'; its runs: {list(runs)}")
        runs = {run_id: runs[run_id]}
    fig = dashboard_figure(runs, title or str(run))
    import matplotlib.pyplot as plt

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


plot = plot_run
