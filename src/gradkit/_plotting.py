"""Plotting helpers shared by gradkit's figures (the bench report, the instruments dashboard).

* :func:`pyplot` — import ``matplotlib.pyplot`` with the headless Agg backend, or raise the
  one-line "``pip install gradkit[extra]``" error when matplotlib is missing.
* :func:`series_styles` — a colour, marker and line style per named series that stay
  distinct for many series: 17 colours (matplotlib's ``tab10`` followed by seven of Kelly's
  colours of maximum contrast that differ from it) and 12 markers. Series ``j`` gets colour
  ``j mod 17`` and marker ``j mod 12``, so every (colour, marker) pair is unique for the first
  204 series and the first 17 series all have different colours.
* :func:`legend_outside` — a single legend to the right of the axes, so it never hides data.

Imports nothing heavy at module level: ``import gradkit._plotting`` does not load matplotlib.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gradkit.errors import require_extra

#: tab10, then Kelly (1965) colours that are not close to a tab10 colour.
PALETTE: tuple[str, ...] = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#222222",  # Kelly black
    "#b3446c",  # Kelly purplish red
    "#8db600",  # Kelly yellow green
    "#882d17",  # Kelly reddish brown
    "#a1caf1",  # Kelly light blue
    "#604e97",  # Kelly violet
    "#f3c300",  # Kelly yellow
)
MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "*")
LINESTYLES: tuple[str, ...] = ("-", "--", "-.", ":")


def pyplot(extra: str, feature: str) -> Any:
    """``matplotlib.pyplot`` on the Agg backend; UsageError naming ``gradkit[extra]`` if absent."""
    matplotlib = require_extra("matplotlib", extra, feature)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def series_styles(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"color", "marker", "ls"}}`` in the order of ``names`` (see module docstring)."""
    return {name: {"color": PALETTE[j % len(PALETTE)], "marker": MARKERS[j % len(MARKERS)],
                   "ls": LINESTYLES[j % len(LINESTYLES)]}
            for j, name in enumerate(names)}


def legend_outside(ax: Any, handles: list | None = None, labels: list[str] | None = None,
                   **kwargs: Any) -> Any:
    """One legend to the right of ``ax`` (save with ``bbox_inches="tight"`` to keep it)."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    return ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                     borderaxespad=0.0, fontsize=8, frameon=False, **kwargs)
