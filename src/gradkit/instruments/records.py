"""Run records: JSONL (one object per step) and SQLite (stdlib ``sqlite3``), optional
TensorBoard, and :func:`load_run` to read a run back.

SQLite schema::

    records(step INTEGER, name TEXT, value REAL, json TEXT)   -- value for scalars,
                                                              -- json for lists/strings
    meta(key TEXT PRIMARY KEY, value TEXT)

Records are buffered and serialised at each flush (every ``flush_every`` records and on
close): JSONL lines in one write, SQLite rows in one transaction, in WAL mode with
``synchronous=NORMAL`` (no fsync per commit).
Non-finite floats are stored as NULL / JSON ``null``.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

from gradkit.errors import UsageError, require_extra

JSONL_NAME = "metrics.jsonl"
SQLITE_NAME = "metrics.sqlite"
SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")


def _clean(value: Any) -> Any:
    if hasattr(value, "tolist"):  # tensors / numpy values from user instruments
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class RunWriter:
    """Writes step records under ``log_dir`` (created if missing)."""

    def __init__(self, log_dir: str | Path, *, jsonl: bool = True, sqlite: bool = True,
                 tensorboard: bool = False, flush_every: int = 50,
                 meta: Mapping[str, str] | None = None):
        self.dir = Path(log_dir)
        self._tb = None
        if tensorboard:  # check the extra before creating anything
            require_extra("tensorboard", "tensorboard", "Monitor(tensorboard=True)")
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.flush_every = flush_every
        self._jsonl = open(self.dir / JSONL_NAME, "a", encoding="utf-8") if jsonl else None
        self._db = None
        if sqlite:
            self._db = sqlite3.connect(self.dir / SQLITE_NAME)
            # WAL + synchronous=NORMAL: commits do not fsync (an application crash still
            # leaves a consistent database; only an OS crash can lose the last commits)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self._db:
                self._db.execute("CREATE TABLE IF NOT EXISTS records "
                                 "(step INTEGER, name TEXT, value REAL, json TEXT)")
                self._db.execute("CREATE TABLE IF NOT EXISTS meta "
                                 "(key TEXT PRIMARY KEY, value TEXT)")
                self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                     list((meta or {}).items()))
        self._records: list[dict[str, Any]] = []

    def write(self, record: Mapping[str, Any]) -> None:
        """Buffer one record (a shallow copy); serialised and written at the next flush."""
        int(record["step"])  # fail here, not at the flush, on a record without a step
        self._records.append(dict(record))
        if len(self._records) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        records, self._records = self._records, []
        lines: list[str] = []
        rows: list[tuple[int, str, float | None, str | None]] = []
        for record in records:
            step = int(record["step"])
            clean = {k: _clean(v) for k, v in record.items()}
            lines.append(json.dumps(clean) + "\n")
            for name, v in clean.items():
                if name == "step":
                    continue
                if isinstance(v, bool) or not isinstance(v, int | float | type(None)):
                    rows.append((step, name, None, json.dumps(v)))
                else:
                    rows.append((step, name, v, None))
                    if self._tb is not None and v is not None:
                        self._tb.add_scalar(name, v, step)
        if self._jsonl is not None:
            self._jsonl.write("".join(lines))
            self._jsonl.flush()
        if self._db is not None and rows:
            with self._db:  # one transaction
                self._db.executemany("INSERT INTO records VALUES (?, ?, ?, ?)", rows)
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self.flush()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


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


def _append(series: Series, step: int, name: str, value: Any) -> None:
    steps, values = series.setdefault(name, ([], []))
    steps.append(step)
    values.append(value)


def load_run(path: str | Path) -> Series:
    """``{name: (steps, values)}`` from a run directory, JSONL or SQLite file (``None`` marks
    non-finite values)."""
    p = resolve_run(path)
    series: Series = {}
    if p.suffix == ".jsonl":
        with open(p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    step = int(rec["step"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise UsageError(f"{p}:{lineno}: not a gradkit record ({exc})") from None
                for name, v in rec.items():
                    if name != "step":
                        _append(series, step, name, v)
        return series
    try:
        with closing(sqlite3.connect(f"file:{p}?mode=ro", uri=True)) as db:
            rows = db.execute("SELECT step, name, value, json FROM records "
                              "ORDER BY rowid").fetchall()
    except sqlite3.DatabaseError as exc:
        raise UsageError(f"'{p}' is not a gradkit SQLite run ({exc})") from None
    for step, name, value, blob in rows:
        _append(series, int(step), name, json.loads(blob) if blob is not None else value)
    return series
