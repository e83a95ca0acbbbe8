"""Run records: JSONL (one object per step) and SQLite (stdlib ``sqlite3``), optional
TensorBoard and MLflow mirrors, and :func:`load_run` / :func:`load_runs` to read them back.

Every writer has a *run id* (``Monitor.run_id``): two Monitors, or a rerun, on one
``log_dir`` append to the same files without mixing, and the readers separate them. JSONL
records carry it as ``"run"``; the SQLite schema is::

    records(step INTEGER, name TEXT, value REAL, json TEXT, run TEXT)
                                  -- value for scalars, json for lists/strings
    runs(run TEXT PRIMARY KEY, started REAL, meta TEXT)   -- meta: a JSON object
    meta(key TEXT PRIMARY KEY, value TEXT)                -- the latest run's meta

Records are buffered and serialised at each flush (every ``flush_every`` records and on
close): JSONL lines in one ``write`` on a file opened in append mode, SQLite rows in one
transaction, in WAL mode with ``synchronous=NORMAL`` (no fsync per commit). Non-finite
floats are stored as NULL / JSON ``null``.

The two files hold the same records. A flush that fails (disk full, file-size limit, a
locked or broken database) is undone in both (the JSONL file is truncated back, the SQLite
transaction rolled back), a warning is issued once, training goes on, and the records stay
buffered (at most ``max_buffered``) and are retried, each time the buffer has doubled and
at close. A process killed
during a JSONL write can leave a truncated last line: the readers skip it with a warning and
the next writer on the file removes it. TensorBoard and MLflow are mirrors: written after
the two files, their failures are warned about once and never stop training.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import sqlite3
import time
import warnings
from collections.abc import Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

from gradkit.errors import UsageError, require_extra

JSONL_NAME = "metrics.jsonl"
SQLITE_NAME = "metrics.sqlite"
SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")
#: the run id of records written before run ids existed
LEGACY_RUN = ""


def _clean(value: Any) -> Any:
    if hasattr(value, "tolist"):  # tensors / numpy values from user instruments
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def new_run_id() -> str:
    """A sortable, unique run id: UTC start time and 6 random hex digits."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


class _TensorBoard:
    """Scalars to ``log_dir/tensorboard/<run id>`` (one TensorBoard run per Monitor run)."""

    def __init__(self, path: Path):
        require_extra("tensorboard", "tensorboard", "Monitor(tensorboard=True)")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(path))

    def write(self, scalars: list[tuple[int, str, float]]) -> None:
        for step, name, value in scalars:
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


_MLFLOW_BAD = re.compile(r"[^\w\-. /]")


class _MLflow:
    """Scalars to an MLflow run: the active run when ``target is True`` and one is active,
    else a new run (named by the Monitor's run id, in the ``experiment``, created if
    missing) in the tracking store ``target`` (a URI, or ``True`` for the configured one).
    Runs this sink started are ended on close. Metric names have ``/`` replaced by ``.``
    and characters MLflow refuses by ``_``."""

    def __init__(self, target: bool | str, run_id: str, experiment: str | None,
                 params: Mapping[str, str]):
        mlflow = require_extra("mlflow", "mlflow", "Monitor(mlflow=...)")
        from mlflow.tracking import MlflowClient

        active = mlflow.active_run() if target is True else None
        self.client = MlflowClient(tracking_uri=None if target is True else str(target))
        self.owned = active is None
        if active is not None:
            self.run_id = active.info.run_id
        else:
            name = experiment or "gradkit"
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
            self.run_id = self.client.create_run(exp_id, run_name=run_id).info.run_id
        self.client.set_tag(self.run_id, "gradkit.run_id", run_id)
        for key, value in params.items():
            self.client.set_tag(self.run_id, f"gradkit.{key}", str(value)[:5000])

    def write(self, scalars: list[tuple[int, str, float]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # "grad_norm/<param>" becomes "grad_norm.<param>": MLflow's file store keeps one file
        # per metric, and a "grad_norm" file cannot also be the directory "grad_norm/"
        metrics = [Metric(_MLFLOW_BAD.sub("_", name).replace("/", "."), value, now, step)
                   for step, name, value in scalars]
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self) -> None:
        if self.owned:
            self.client.set_terminated(self.run_id)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _drop_partial_line(path: Path) -> None:
    """Cut a truncated last line (no final newline: a writer was killed mid-write)."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        keep = max(0, size - 65536)
        f.seek(keep)
        tail = f.read()
        while b"\n" not in tail and keep > 0:  # a longer line: look further back
            keep = max(0, keep - 65536)
            f.seek(keep)
            tail = f.read()
        cut = keep + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
        f.truncate(cut)
    warnings.warn(f"{path}: removed a truncated last line ({size - cut} bytes, an "
                  "interrupted write)", RuntimeWarning, stacklevel=4)


class RunWriter:
    """Writes step records of one run under ``log_dir`` (created if missing).

    Args:
        log_dir: the run directory (``None``: no files, e.g. MLflow only).
        jsonl, sqlite: write ``metrics.jsonl`` / ``metrics.sqlite``.
        tensorboard: mirror scalars to ``log_dir/tensorboard/<run_id>`` (needs
            ``pip install 'gradkit[tensorboard]'``).
        mlflow: mirror scalars to MLflow: ``True`` (the active run, else a new run in the
            configured tracking store) or a tracking URI (needs
            ``pip install 'gradkit[mlflow]'``).
        mlflow_experiment: experiment of a new MLflow run (default ``"gradkit"``).
        flush_every: records between two writes.
        max_buffered: records kept in memory while writing fails (the oldest are dropped
            beyond it).
        meta: ``{key: value}`` strings stored with the run.
        run_id: the run id (default :func:`new_run_id`).
    """

    def __init__(self, log_dir: str | Path | None, *, jsonl: bool = True, sqlite: bool = True,
                 tensorboard: bool = False, mlflow: bool | str = False,
                 mlflow_experiment: str | None = None, flush_every: int = 50,
                 max_buffered: int = 100_000, meta: Mapping[str, str] | None = None,
                 run_id: str | None = None):
        if log_dir is None and (jsonl or sqlite or tensorboard):
            raise ValueError("a RunWriter without log_dir can only mirror to MLflow")
        self.run_id = run_id or new_run_id()
        self.dir = None if log_dir is None else Path(log_dir)
        meta = dict(meta or {})
        self._mirrors: list[Any] = []
        if tensorboard:  # check the extras before creating anything
            require_extra("tensorboard", "tensorboard", "Monitor(tensorboard=True)")
        if mlflow:
            require_extra("mlflow", "mlflow", "Monitor(mlflow=...)")
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            self._mirrors.append(_TensorBoard(self.dir / "tensorboard" / self.run_id))
        if mlflow:
            self._mirrors.append(_MLflow(mlflow, self.run_id, mlflow_experiment, meta))
        self.flush_every, self.max_buffered = flush_every, max_buffered
        self._fd: int | None = None
        if jsonl:
            path = self.dir / JSONL_NAME
            if path.exists():
                _drop_partial_line(path)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._db: sqlite3.Connection | None = None
        if sqlite:
            self._db = sqlite3.connect(self.dir / SQLITE_NAME, timeout=30)
            # WAL + synchronous=NORMAL: commits do not fsync (an application crash still
            # leaves a consistent database; only an OS crash can lose the last commits)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self._db:
                self._db.execute("CREATE TABLE IF NOT EXISTS records "
                                 "(step INTEGER, name TEXT, value REAL, json TEXT, run TEXT)")
                columns = {row[1] for row in self._db.execute("PRAGMA table_info(records)")}
                if "run" not in columns:  # a file written before run ids
                    self._db.execute("ALTER TABLE records ADD COLUMN run TEXT")
                self._db.execute("CREATE TABLE IF NOT EXISTS runs "
                                 "(run TEXT PRIMARY KEY, started REAL, meta TEXT)")
                self._db.execute("CREATE TABLE IF NOT EXISTS meta "
                                 "(key TEXT PRIMARY KEY, value TEXT)")
                self._db.execute("INSERT INTO runs VALUES (?, ?, ?)",
                                 (self.run_id, time.time(), json.dumps(meta)))
                self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                     list(meta.items()))
        self._records: list[dict[str, Any]] = []
        self._failing = False  # the last flush failed (warned once per failure spell)
        self._retry_at = 0  # while failing: buffered records before the next attempt
        self._mirror_warned: set[int] = set()
        #: records dropped because writing kept failing and the buffer was full
        self.dropped = 0

    def write(self, record: Mapping[str, Any]) -> None:
        """Buffer one record (a shallow copy); serialised and written at the next flush."""
        int(record["step"])  # fail here, not at the flush, on a record without a step
        self._records.append(dict(record))
        if len(self._records) >= self.flush_every:
            self.flush()

    def _serialise(self, records: list[dict[str, Any]]):
        lines: list[str] = []
        rows: list[tuple[int, str, float | None, str | None, str]] = []
        scalars: list[tuple[int, str, float]] = []
        for record in records:
            step = int(record["step"])
            clean = {k: _clean(v) for k, v in record.items()}
            lines.append(json.dumps({"step": step, "run": self.run_id, **clean}) + "\n")
            for name, v in clean.items():
                if name == "step":
                    continue
                if isinstance(v, bool) or not isinstance(v, int | float | type(None)):
                    rows.append((step, name, None, json.dumps(v), self.run_id))
                else:
                    rows.append((step, name, v, None, self.run_id))
                    if v is not None:
                        scalars.append((step, name, v))
        return "".join(lines).encode("utf-8"), rows, scalars

    def _write_files(self, data: bytes, rows: list[tuple]) -> None:
        """Both files or neither: a failed write is undone in the other."""
        start = None
        if self._fd is not None and data:
            start = os.fstat(self._fd).st_size  # O_APPEND: our bytes go at the end
            try:
                _write_all(self._fd, data)
            except OSError:
                self._truncate(start)
                raise
        if self._db is not None and rows:
            try:
                with self._db:  # one transaction, rolled back on error
                    self._db.executemany("INSERT INTO records VALUES (?, ?, ?, ?, ?)", rows)
            except sqlite3.Error:
                if start is not None:
                    self._truncate(start)
                raise

    def _truncate(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
        except OSError:
            pass  # e.g. a device that cannot be truncated; the reader skips a partial line

    def flush(self) -> None:
        """Write the buffered records; never raises on I/O errors (see the module notes)."""
        if not self._records or len(self._records) < self._retry_at:
            return
        data, rows, scalars = self._serialise(self._records)
        try:
            self._write_files(data, rows)
        except (OSError, sqlite3.Error) as exc:
            if not self._failing:
                warnings.warn(
                    f"gradkit: could not write records to {self.dir} ({type(exc).__name__}: "
                    f"{exc}); training continues, both files stay consistent and the records "
                    f"are kept in memory (up to {self.max_buffered}) and retried later",
                    RuntimeWarning, stacklevel=4)
            self._failing = True
            self._retry_at = 2 * len(self._records)  # back off: O(n) retried records in all
            over = len(self._records) - self.max_buffered
            if over > 0:
                del self._records[:over]
                self.dropped += over
            return
        if self._failing:
            warnings.warn(f"gradkit: writing records to {self.dir} works again",
                          RuntimeWarning, stacklevel=4)
            self._failing = False
        self._records, self._retry_at = [], 0
        for i, mirror in enumerate(self._mirrors):
            try:
                mirror.write(scalars)
            except Exception as exc:  # a viewer's failure must never stop training
                if i not in self._mirror_warned:
                    self._mirror_warned.add(i)
                    warnings.warn(f"gradkit: {type(mirror).__name__[1:]} mirror failed "
                                  f"({type(exc).__name__}: {exc}); the JSONL/SQLite records "
                                  "are unaffected", RuntimeWarning, stacklevel=4)

    def close(self) -> None:
        """Flush and close every sink (safe to call twice)."""
        self._retry_at = 0  # a last attempt
        self.flush()
        if self._records or self.dropped:
            warnings.warn(f"gradkit: {len(self._records) + self.dropped} records could not "
                          f"be written to {self.dir}", RuntimeWarning, stacklevel=3)
            self._records = []
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._db is not None:
            self._db.close()
            self._db = None
        for mirror in self._mirrors:
            try:
                mirror.close()
            except Exception as exc:
                warnings.warn(f"gradkit: closing the {type(mirror).__name__[1:]} mirror "
                              f"failed ({exc})", RuntimeWarning, stacklevel=3)
        self._mirrors = []


Series = dict[str, tuple[list[int], list[Any]]]


def resolve_run(path: str | Path) -> Path:
    """The records file of a run: ``path`` itself (``.jsonl`` / ``.sqlite``) or, for a
    directory, its ``metrics.jsonl`` (else ``metrics.sqlite``)."""
    p = Path(path)
    if p.is_dir():
        for name in (JSONL_NAME, SQLITE_NAME):
            if (p / name).is_file():
                return p / name
        raise UsageError(f"no {JSONL_NAME} or {SQLITE_NAME} in run directory '{p}'")
    if not p.exists():
        raise UsageError(f"run '{p}' does not exist")
    if p.suffix not in (".jsonl", *SQLITE_SUFFIXES):
        raise UsageError(f"run '{p}' is not a .jsonl or .sqlite records file or a run directory")
    return p


def _append(runs: dict[str, Series], run: str, step: int, name: str, value: Any) -> None:
    steps, values = runs.setdefault(run, {}).setdefault(name, ([], []))
    steps.append(step)
    values.append(value)


def _read_jsonl(p: Path) -> dict[str, Series]:
    runs: dict[str, Series] = {}
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                step = int(rec["step"])
            except (ValueError, KeyError, TypeError) as exc:
                if not line.endswith("\n"):  # the last line, cut short by a kill or full disk
                    warnings.warn(f"{p}:{lineno}: skipped a truncated last line "
                                  "(an interrupted write)", RuntimeWarning, stacklevel=4)
                    break
                raise UsageError(f"{p}:{lineno}: not a gradkit record ({exc})") from None
            run = str(rec.pop("run", LEGACY_RUN))
            for name, v in rec.items():
                if name != "step":
                    _append(runs, run, step, name, v)
    return runs


def _read_sqlite(p: Path) -> dict[str, Series]:
    runs: dict[str, Series] = {}
    # a read-write connection, so that closing it (the last one) checkpoints the WAL and
    # removes the -wal/-shm files; read-only when the file cannot be written
    uri = f"file:{p}?mode={'rw' if os.access(p, os.W_OK) else 'ro'}"
    try:
        with closing(sqlite3.connect(uri, uri=True, timeout=30)) as db:
            columns = {row[1] for row in db.execute("PRAGMA table_info(records)")}
            run_col = "run" if "run" in columns else "NULL"
            rows = db.execute(f"SELECT {run_col}, step, name, value, json FROM records "
                              "ORDER BY rowid").fetchall()
            started = []
            if db.execute("SELECT name FROM sqlite_master WHERE name = 'runs'").fetchone():
                started = [r for (r,) in db.execute("SELECT run FROM runs ORDER BY rowid")]
    except sqlite3.DatabaseError as exc:
        raise UsageError(f"'{p}' is not a gradkit SQLite run ({exc})") from None
    runs[LEGACY_RUN] = {}  # records from before run ids come first
    for run in started:  # then the runs in the order they started
        runs[run] = {}
    for run, step, name, value, blob in rows:
        run = LEGACY_RUN if run is None else run
        _append(runs, run, int(step), name, json.loads(blob) if blob is not None else value)
    return {run: series for run, series in runs.items() if series}  # as the JSONL holds them


def load_runs(path: str | Path) -> dict[str, Series]:
    """``{run id: {name: (steps, values)}}`` of every run in a run directory, JSONL or SQLite
    file, in the order the runs started (records written before run ids have the run id
    ``""``; ``None`` marks non-finite values).

    Args:
        path: a run directory (its ``metrics.jsonl``, else ``metrics.sqlite``) or one of
            those files.

    Example::

        >>> import tempfile, torch
        >>> from torch import nn
        >>> from gradkit.instruments import Loss, Monitor, load_runs
        >>> model, loss_fn = nn.Linear(2, 2), nn.functional.cross_entropy
        >>> x, y = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
        >>> with tempfile.TemporaryDirectory() as run_dir:
        ...     for _ in range(2):  # two runs on one directory
        ...         with Monitor(model, loss_fn, instruments=[Loss()], log_dir=run_dir) as m:
        ...             for _ in range(3):
        ...                 _ = m.step((x, y), loss=loss_fn(model(x), y))
        ...     runs = load_runs(run_dir)
        >>> len(runs), [series["loss"][0] for series in runs.values()]
        (2, [[0, 1, 2], [0, 1, 2]])
    """
    p = resolve_run(path)
    return _read_jsonl(p) if p.suffix == ".jsonl" else _read_sqlite(p)


def load_run(path: str | Path, run: str | None = None) -> Series:
    """``{name: (steps, values)}`` of one run (``None`` marks non-finite values).

    Args:
        path: a run directory or its ``metrics.jsonl`` / ``metrics.sqlite`` file.
        run: the run id (``Monitor.run_id``); default: the only run, or, when the files
            hold several, the one started last (with a warning naming the others).

    Example::

        >>> import tempfile, torch
        >>> from torch import nn
        >>> from gradkit.instruments import GradNorm, Loss, Monitor, load_run
        >>> model, loss_fn = nn.Linear(2, 2), nn.functional.cross_entropy
        >>> x, y = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
        >>> with tempfile.TemporaryDirectory() as run_dir:
        ...     with Monitor(model, loss_fn, instruments=[Loss(), GradNorm(every=2)],
        ...                  log_dir=run_dir) as monitor:
        ...         for _ in range(5):
        ...             _ = monitor.step((x, y), loss=loss_fn(model(x), y))
        ...     series = load_run(run_dir)
        >>> series["loss"][0], series["grad_norm"][0]
        ([0, 1, 2, 3, 4], [0, 2, 4])
    """
    runs = load_runs(path)
    if run is not None:
        if run not in runs:
            raise UsageError(f"run '{run}' is not in '{path}'; its runs: {list(runs) or 'none'}")
        return runs[run]
    if not runs:
        return {}
    if len(runs) > 1:
        warnings.warn(f"'{path}' holds {len(runs)} runs {list(runs)}; reading the last one "
                      "(pass run=... to choose)", UserWarning, stacklevel=2)
    return runs[list(runs)[-1]]
