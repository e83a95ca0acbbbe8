"""``gradkit plot RUN [--out PNG]``: the dashboard of a recorded Monitor run.

Cheap to import (no torch, no matplotlib): the work happens in the handler.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plot", help="draw the dashboard PNG of a Monitor run",
        description="Draw a PNG dashboard (loss, gradient norm, sharpness vs its threshold, "
                    "trace, coherence, noise scale, neural collapse) of a Monitor run.")
    p.add_argument("run", metavar="RUN",
                   help="run directory, or its metrics.jsonl / metrics.sqlite file")
    p.add_argument("--out", metavar="PNG", default=None,
                   help="output PNG (default: dashboard.png next to the records)")
    p.add_argument("--title", default=None, help="figure title (default: the run path)")
    p.add_argument("--run", metavar="ID", default=None, dest="run_id",
                   help="draw only this run id (default: every run in the files, one colour "
                        "each)")
    p.set_defaults(handler=_plot)


def _plot(args: argparse.Namespace) -> int:
    from gradkit.errors import UsageError
    from gradkit.instruments.dashboard import plot_run
    from gradkit.instruments.records import resolve_run

    records = resolve_run(args.run)
    out = Path(args.out) if args.out else records.parent / "dashboard.png"
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must be a .png file, got '{out}'")
    path = plot_run(args.run, out, title=args.title, run_id=args.run_id)
    print(f"wrote {path}")
    return 0
