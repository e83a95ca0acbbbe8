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


#: Upper bounds of the numeric options (checked before anything is allocated or spawned).
MAX_TRIALS, MAX_SEEDS = 1000, 100
MAX_JOBS = 256
DEFAULT_TRIAL_TIMEOUT = 900.0


def _int_between(minimum: int, maximum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(
                f"must be an integer from {minimum} to {maximum}, got {value}")
        return value

    parse.__name__ = f"integer in [{minimum}, {maximum}]"
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not (value >= 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def _path(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


_OPTIMIZER_HELP = """\
optimizer(s) instead of the default set (repeatable): a registry name (see --list) or
package.module:Class, optionally followed by :SETTINGS, comma-separated NAME=VALUE (fixed in
every trial) or NAME=LOW..HIGH (searched log-uniformly instead of the declared range), e.g.
adamw:weight_decay=0.1, 'adamw:lr=1e-4..1e-1,weight_decay=0.01', mypkg.optim:MyOpt:lr=0.01.
Modules are imported from the current directory first, as 'python -m' does."""


def add_subcommands(subparsers) -> None:
    bench = subparsers.add_parser(
        "bench", help="run the optimizer benchmark (default: the quick suite)",
        description="Fair optimizer benchmark: equal tuning budgets, selection on validation, "
                    "seed reruns, time to target, performance profiles. Results go to an "
                    "SQLite database; rerunning the same command resumes.")
    bench.add_argument("--suite", default="quick", help="quick (default), full or tiny")
    bench.add_argument("--workload", action="append", metavar="NAME|module:factory",
                       help="workload(s) to run instead of the suite's (repeatable); "
                            "package.module:factory is imported from the current directory "
                            "first (see the README for the workload protocol)")
    bench.add_argument("--optimizer", action="append", metavar="NAME[:SETTINGS]",
                       help=_OPTIMIZER_HELP)
    bench.add_argument("--trials", type=_int_between(0, MAX_TRIALS), metavar="N",
                       help="quasi-random tuning trials per study besides the defaults "
                            f"(default: the suite's; at most {MAX_TRIALS})")
    bench.add_argument("--seeds", type=_int_between(1, MAX_SEEDS), metavar="N",
                       help="seeds for the selected configuration (default: the suite's; "
                            f"at most {MAX_SEEDS})")
    bench.add_argument("--jobs", type=_int_between(1, MAX_JOBS), metavar="N",
                       default=min(os.cpu_count() or 1, 8),
                       help="parallel worker processes (default: number of CPUs, at most 8; "
                            "no more than 4 per CPU)")
    bench.add_argument("--trial-timeout", type=_seconds, metavar="SECONDS",
                       default=DEFAULT_TRIAL_TIMEOUT,
                       help="a trial still running after this many seconds is stopped and "
                            f"recorded as failed (default: {DEFAULT_TRIAL_TIMEOUT:g}; 0: no "
                            "limit; local backend only)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                       help="where trials train (default: cpu; cuda needs a CUDA build of "
                            "torch and a GPU)")
    bench.add_argument("--diagnose", metavar="NAMES",
                       help="comma-separated instruments read at every evaluation point, "
                            "untimed, into the database's diagnostics table: grad_norm, "
                            "sharpness, update_ratio, noise_scale (scores do not change)")
    bench.add_argument("--in-process", action="store_true",
                       help="run trials in this process, one at a time (for debugging: no "
                            "trial timeout, and a trial that kills its process ends the run)")
    bench.add_argument("--backend", choices=("local", "ray"), default="local",
                       help="local processes (default) or a Ray cluster (gradkit[ray])")
    bench.add_argument("--ray-address", metavar="ADDR",
                       help="ray.init(address=...) for --backend ray (default: local Ray)")
    bench.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", type=_path,
                       help=f"output directory (default: ./{DEFAULT_OUT})")
    bench.add_argument("--db", metavar="PATH", type=_path,
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
    report.add_argument("db", metavar="DB", type=_path,
                        help="results database written by 'gradkit bench', or the folder "
                             "holding it (e.g. gradkit-bench)")
    report.add_argument("--out", metavar="DIR", type=_path,
                        help="output directory (default: DB's folder/report)")
    report.add_argument("--suite", help="suite to report (default: the latest run in DB)")
    report.set_defaults(handler=report_command)


# ---------------------------------------------------------------------------- validation
def check_writable(path: Path, *, directory: bool, option: str) -> None:
    """UsageError unless ``path`` can be created/written; leaves nothing behind.

    ``option`` is the command-line option that chose ``path`` (named in the message).
    """
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
                         f"another with {option}") from None


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
        entries.append(WorkloadEntry(spec, overrides, resolve_workload(spec, overrides),
                                     args.device))
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
def _import_from_cwd() -> None:
    """Let ``package.module:attr`` resolve from the current directory, as ``python -m`` does
    (the ``gradkit`` console script's ``sys.path`` starts with its own bin directory).
    Spawned workers inherit ``sys.path``."""
    import sys

    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def _check_jobs(args) -> None:
    from gradkit.errors import UsageError

    cpus = os.cpu_count() or 1
    if args.backend == "local" and args.jobs > 4 * cpus:
        raise UsageError(f"--jobs {args.jobs} is more than 4 worker processes per CPU "
                         f"({cpus} CPUs here); use at most --jobs {4 * cpus}")


def _check_device(device: str) -> None:
    from gradkit.errors import UsageError

    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: torch sees no CUDA device (torch "
                             f"{torch.__version__}, torch.cuda.is_available() is False); "
                             "use --device cpu")


def bench_command(args) -> int:
    if args.list:
        return _list_everything()
    from gradkit.errors import UsageError

    _import_from_cwd()
    _check_jobs(args)
    if args.in_process and args.backend == "ray":
        raise UsageError("--in-process and --backend ray exclude each other")
    suite, entries, optimizers, notes = _resolve_inputs(args)
    _check_device(args.device)
    if args.backend == "ray":
        from gradkit.bench.executors import check_ray_available

        check_ray_available()
    elif args.ray_address:
        raise UsageError("--ray-address needs --backend ray")
    out = Path(args.out)
    db = Path(args.db) if args.db else out / "results.sqlite"
    check_writable(out, directory=True, option="--out")
    check_writable(db, directory=False, option="--db" if args.db else "--out")
    from gradkit.bench.protocol import build_studies, run_arguments
    from gradkit.bench.store import Store

    diagnose: tuple[str, ...] = ()
    if args.diagnose is not None:
        from gradkit.bench.diagnostics import parse_names

        diagnose = parse_names(args.diagnose)
    studies = build_studies(suite, entries, optimizers, diagnose)
    arguments = run_arguments(suite, entries, optimizers)
    if db.exists():
        store = Store.open_existing(db)  # refuses a file that is not a gradkit database
        try:
            store.check_same_run(suite.name, suite.version, arguments)
        finally:
            store.close()
    elif args.resume:
        raise UsageError(f"--resume: no database at {str(db)!r} to resume")
    return _run(args, suite, studies, arguments, notes, out, db)


def _run(args, suite, studies, arguments, notes, out: Path, db: Path) -> int:
    import sys

    from gradkit.bench.executors import make_executor
    from gradkit.bench.orchestrate import WorkerError, run_studies
    from gradkit.bench.report import summary_text, write_report
    from gradkit.bench.store import RunLock, Store

    out.mkdir(parents=True, exist_ok=True)
    db.parent.mkdir(parents=True, exist_ok=True)
    with RunLock(db):
        store = Store.create(db)
        try:
            store.check_same_run(suite.name, suite.version, arguments)  # a racing run
            store.declare(
                suite.name, suite.version,
                [(e["name"], e["spec"], e["identity"]) for e in arguments["workloads"]],
                [{"workload": s.entry.name, "optimizer": s.optimizer.name,
                  "space": s.optimizer.describe_space(),
                  "torch_baseline": s.optimizer.is_torch_baseline,
                  "n_trials": suite.n_trials, "seeds": list(suite.seeds)} for s in studies],
                notes, arguments)
            store.set_meta(f"environment:{suite.name}:{suite.version}", _environment(args))
            if not args.quiet:
                for note in notes:
                    print(f"note: {note}", file=sys.stderr)

            def header(to_run: int, finished: int) -> None:
                if not args.quiet:
                    print(f"gradkit bench: suite {suite.name} (version {suite.version}), "
                          f"{len(arguments['workloads'])} workloads x "
                          f"{len(arguments['optimizers'])} optimizers, "
                          f"{suite.n_trials + 1} tuning trials + {len(suite.seeds) - 1} seed "
                          f"reruns per study: {to_run} trials to run, {finished} already "
                          f"finished; {_where(args)}; database {db.resolve()}", flush=True)

            executor = make_executor(args.backend, args.jobs, args.ray_address,
                                     trial_timeout=args.trial_timeout or None,
                                     in_process=args.in_process)
            try:
                stats = run_studies(store, suite, studies, executor, quiet=args.quiet,
                                    on_start=header)
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
        finally:
            store.close()
    statuses = ", ".join(f"{v} {k}" for k, v in sorted(stats.statuses.items())) or "none"
    lines.append(f"database: {db.resolve()}")
    lines.append(f"trials: ran {stats.ran} ({statuses}), {stats.skipped} already finished; "
                 f"{_where(args)}")
    lines.append(f"wall time: {time.perf_counter() - _T0:.1f} s (including the report)")
    print("\n".join(lines))
    return 0


def _where(args) -> str:
    if args.in_process:
        return f"in-process, device {args.device}"
    return f"backend {args.backend}, jobs {args.jobs}, device {args.device}"


def _environment(args) -> str:
    """One line describing the machine and software of the latest run (shown in the report)."""
    import platform

    import torch

    from gradkit import __version__

    return (f"gradkit {__version__}, torch {torch.__version__}, Python "
            f"{platform.python_version()}, {platform.system()} {platform.machine()}, "
            f"{os.cpu_count()} CPUs, {_where(args)}, one torch thread per worker")


def report_command(args) -> int:
    from gradkit.bench.report import summary_text, write_report
    from gradkit.bench.store import Store

    db = Path(args.db)
    if db.is_dir():  # ``gradkit report gradkit-bench``: the database inside the folder
        db = db / "results.sqlite"
    out = Path(args.out) if args.out else db.parent / "report"
    store = Store.open_existing(db)  # read-only: the report never writes into a database
    try:
        check_writable(out, directory=True, option="--out")
        index, analysis = write_report(store, out, args.suite)
    finally:
        store.close()
    print(summary_text(analysis))
    print(f"\nreport: {index.resolve()} (CSV files alongside)")
    return 0
