"""Shared helpers of the bench tests: run the CLI in-process, read CSVs without wall-clock."""

from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path

from gradkit.cli import main


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``gradkit ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse errors
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def step_based_csv(path: Path) -> list[list[str]]:
    """A report CSV without its wall-clock columns (names containing 'seconds')."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    keep = [k for k, name in enumerate(rows[0]) if "seconds" not in name]
    return [[row[k] for k in keep] for row in rows]


REPORT_CSVS = ("leaderboard.csv", "time_to_target.csv", "final_metrics.csv", "trials.csv")


def report_content(report_dir: Path) -> dict[str, list[list[str]]]:
    return {name: step_based_csv(report_dir / name) for name in REPORT_CSVS}
