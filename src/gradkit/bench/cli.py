"""``gradkit bench`` and ``gradkit report`` (contributed to the ``gradkit`` dispatcher).

Everything the user typed is validated before anything is created on disk: an unknown suite,
workload or optimizer, a malformed ``module:attr``, an invalid number, a missing Ray install or
an unwritable output path exits with code 2 and one line, and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

_T0 = time.perf_counter()  # imported by the dispatcher at start-up: wall time includes imports

DEFAULT_OUT = "gradkit-bench"


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def add_subcommands(subparsers) -> None:
    bench = subparsers.add_parser(
        "bench", help="run the optimizer benchmark (default: the quick suite)",
        description="Fair optimizer benchmark: equal tuning budgets, selection on validation, "
                    "seed reruns, time to target, performance profiles. Results go to an "
                    "SQLite database; rerunning the same command resumes.")
    bench.add_argument("--suite", default="quick", help="quick (default), full or tiny")
    bench.add_argument("--workload", action="append", metavar="NAME|module:factory",
                       help="workload(s) to run instead of the suite's (repeatable)")
    bench.add_argument("--optimizer", action="append", metavar="NAME|module:Class",
                       help="optimizer(s) instead of the default set (repeatable)")
    bench.add_argument("--trials", type=_int_at_least(0), metavar="N",
                       help="quasi-random tuning trials per study besides the defaults "
                            "(default: the suite's)")
    bench.add_argument("--seeds", type=_int_at_least(1), metavar="N",
                       help="seeds for the selected configuration (default: the suite's)")
    bench.add_argument("--jobs", type=_int_at_least(1), metavar="N",
                       default=min(os.cpu_count() or 1, 8),
                       help="parallel worker processes (default: number of CPUs, at most 8)")
    bench.add_argument("--backend", choices=("local", "ray"), default="local",
                       help="local processes (default) or a Ray cluster (gradkit[ray])")
    bench.add_argument("--ray-address", metavar="ADDR",
                       help="ray.init(address=...) for --backend ray (default: local Ray)")
    bench.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                       help=f"output directory (default: ./{DEFAULT_OUT})")
    bench.add_argument("--db", metavar="PATH",
                       help="results database (default: OUT/results.sqlite)")
    bench.add_argument("--resume", action="store_true",
                       help="require an existing database and complete it (rerunning without "
                            "--resume also skips finished trials)")
    bench.add_argument("--no-report", action="store_true", help="skip the HTML report")
    bench.add_argument("--quiet", action="store_true", help="no progress bars or trial messages")
    bench.add_argument("--list", action="store_true",
                       help="list suites, workloads and optimizers, then exit")
    bench.set_defaults(handler=bench_command)

    report = subparsers.add_parser(
        "report", help="write the HTML/CSV report of a results database",
        description="Static HTML report (PNG plots) and CSV export of a gradkit bench database.")
    report.add_argument("db", metavar="DB", help="results database written by 'gradkit bench'")
    report.add_argument("--out", metavar="DIR", help="output directory (default: DB's dir/report)")
    report.add_argument("--suite", help="suite to report (default: the latest run in DB)")
    report.set_defaults(handler=report_command)


# ---------------------------------------------------------------------------- validation
def check_writable(path: Path, *, directory: bool) -> None:
    """UsageError unless ``path`` can be created/written; leaves nothing behind."""
    from gradkit.errors import UsageError

    path = Path(os.path.abspath(path))
    what = "output directory" if directory else "database path"
    if path.exists():
        if directory and not path.is_dir():
            raise UsageError(f"{what} {str(path)!r} exists and is not a directory")
        if not directory and path.is_dir():
            raise UsageError(f"{what} {str(path)!r} is a directory; give a file path")
    probe_dir = path if path.is_dir() else path.parent
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise UsageError(f"cannot create {what} {str(path)!r}: {str(probe_dir)!r} is not a "
                         "directory")
    try:
        fd, name = tempfile.mkstemp(dir=probe_dir, prefix=".gradkit-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise UsageError(f"{what} {str(path)!r} is not writable ({exc.strerror}); choose "
                         "another with --out/--db") from None


def _resolve_inputs(args):
    """Resolve suite, workloads and optimizers (all UsageError on bad input)."""
    from dataclasses import replace

    from gradkit.bench.optimizers import default_optimizers, resolve_optimizer
    from gradkit.bench.protocol import WorkloadEntry
    from gradkit.bench.suites import get_suite
    from gradkit.bench.workloads import resolve_workload
    from gradkit.errors import UsageError

    suite = get_suite(args.suite)
    if args.trials is not None:
        suite = replace(suite, n_trials=args.trials)
    if args.seeds is not None:
        suite = replace(suite, seeds=tuple(range(args.seeds)))
    entries = []
    for spec in args.workload or suite.workloads:
        overrides = {} if ":" in spec else suite.overrides.get(spec, {})
        entries.append(WorkloadEntry(spec, overrides, resolve_workload(spec, overrides)))
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise UsageError(f"workload names must be distinct, got {', '.join(names)}")
    notes: list[str] = []
    if args.optimizer:
        optimizers = [resolve_optimizer(o) for o in args.optimizer]
        labels = [o.name for o in optimizers]
        if len(set(labels)) != len(labels):
            raise UsageError(f"optimizers must be distinct, got {', '.join(labels)}")
    else:
        optimizers, notes = default_optimizers()
        if not optimizers:
            raise UsageError("none of the default optimizers is registered in gradkit.optim")
    return suite, entries, optimizers, notes


def _list_everything() -> int:
    from gradkit.bench.optimizers import DEFAULT_TABLE, registry_names
    from gradkit.bench.suites import SUITES
    from gradkit.bench.workloads import BUILTIN

    print("suites:")
    for s in SUITES.values():
        print(f"  {s.name:<8} {s.description}; workloads: {', '.join(s.workloads)}")
    print("workloads: " + ", ".join(BUILTIN) + " (or package.module:factory)")
    registered = set(registry_names())
    print("default optimizers: " + ", ".join(
        f"{e.name}{'' if e.name in registered else ' (not registered yet)'}"
        for e in DEFAULT_TABLE))
    print("registered optimizers: " + ", ".join(sorted(registered))
          + " (or package.module:Class)")
    return 0


# ------------------------------------------------------------------------------- commands
def bench_command(args) -> int:
    if args.list:
        return _list_everything()
    from gradkit.errors import UsageError

    suite, entries, optimizers, notes = _resolve_inputs(args)
    if args.backend == "ray":
        from gradkit.bench.executors import check_ray_available

        check_ray_available()
    elif args.ray_address:
        raise UsageError("--ray-address needs --backend ray")
    out = Path(args.out)
    db = Path(args.db) if args.db else out / "results.sqlite"
    check_writable(out, directory=True)
    check_writable(db, directory=False)
    from gradkit.bench.store import Store

    if db.exists():
        Store.open_existing(db).close()  # refuses a file that is not a gradkit database
    elif args.resume:
        raise UsageError(f"--resume: no database at {str(db)!r} to resume")
    return _run(args, suite, entries, optimizers, notes, out, db)


def _run(args, suite, entries, optimizers, notes, out: Path, db: Path) -> int:
    import sys

    from gradkit.bench.executors import make_executor
    from gradkit.bench.orchestrate import WorkerError, run_studies
    from gradkit.bench.protocol import build_studies
    from gradkit.bench.report import summary_text, write_report
    from gradkit.bench.store import Store

    out.mkdir(parents=True, exist_ok=True)
    db.parent.mkdir(parents=True, exist_ok=True)
    store = Store.create(db)
    studies = build_studies(suite, entries, optimizers)
    store.declare(
        suite.name, suite.version,
        [(e.name, e.spec, e.identity()) for e in entries],
        [{"workload": s.entry.name, "optimizer": s.optimizer.name,
          "space": s.optimizer.describe_space(), "torch_baseline": s.optimizer.is_torch_baseline,
          "n_trials": suite.n_trials, "seeds": list(suite.seeds)} for s in studies],
        notes)
    store.set_meta(f"environment:{suite.name}:{suite.version}", _environment(args))
    if not args.quiet:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    executor = make_executor(args.backend, args.jobs, args.ray_address)
    try:
        stats = run_studies(store, suite, studies, executor, quiet=args.quiet)
    except WorkerError as exc:
        executor.abort()
        print(f"gradkit bench: error: {exc}", file=sys.stderr)
        return 1
    except BaseException:
        executor.abort()
        raise
    executor.close()
    lines = []
    if not args.no_report:
        index, analysis = write_report(store, out / "report", suite.name)
        lines.append(summary_text(analysis))
        lines.append(f"\nreport: {index.resolve()} (CSV files alongside)")
    store.close()
    statuses = ", ".join(f"{v} {k}" for k, v in sorted(stats.statuses.items())) or "none"
    lines.append(f"database: {db.resolve()}")
    lines.append(f"trials: ran {stats.ran} ({statuses}), {stats.skipped} already finished; "
                 f"backend {args.backend}, jobs {args.jobs}")
    lines.append(f"wall time: {time.perf_counter() - _T0:.1f} s (including the report)")
    print("\n".join(lines))
    return 0


def _environment(args) -> str:
    """One line describing the machine and software of the latest run (shown in the report)."""
    import platform

    import torch

    from gradkit import __version__

    return (f"gradkit {__version__}, torch {torch.__version__}, Python "
            f"{platform.python_version()}, {platform.system()} {platform.machine()}, "
            f"{os.cpu_count()} CPUs, backend {args.backend}, jobs {args.jobs}, one torch thread "
            "per worker")


def report_command(args) -> int:
    from gradkit.bench.report import summary_text, write_report
    from gradkit.bench.store import Store

    db = Path(args.db)
    out = Path(args.out) if args.out else db.parent / "report"
    store = Store.open_existing(db)  # read-only: the report never writes into a database
    try:
        check_writable(out, directory=True)
        index, analysis = write_report(store, out, args.suite)
    finally:
        store.close()
    print(summary_text(analysis))
    print(f"\nreport: {index.resolve()} (CSV files alongside)")
    return 0
