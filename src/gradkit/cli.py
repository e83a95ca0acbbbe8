"""The ``gradkit`` command line: ``gradkit bench``, ``gradkit report``, ``gradkit plot``.

Each pillar contributes its subcommands through ``add_subcommands(subparsers)`` in its own
``cli`` module; this file only dispatches. Bad input exits with code 2 and one line on stderr
(never a traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from gradkit.errors import GradkitError

# Modules that contribute subcommands. Each must be cheap to import (no torch at top level is
# not required, but heavy work belongs in the handlers).
SUBCOMMAND_MODULES = ("gradkit.bench.cli", "gradkit.instruments.cli")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad usage as a single line and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="gradkit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # pillar not present in this build
                continue
            raise
        module.add_subcommands(sub)
    return parser


def _version() -> str:
    from gradkit import __version__

    return f"gradkit {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (GradkitError, ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"gradkit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gradkit {args.command}: interrupted; finished results are saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
