"""SQLite results store (stdlib ``sqlite3``, WAL journal).

Only the parent process writes. Each finished trial (its row, all its curve points and its
diagnostics) is inserted in one transaction, so a run killed at any moment (even ``kill -9``)
leaves a consistent database: a trial is either fully present or absent. Rerunning the same
command skips the keys already present and runs the rest.

Tables: ``meta`` (schema version, run arguments, environment), ``workloads`` (declared fields
per suite version), ``studies`` (workload × optimizer with its declared search space),
``notes`` (e.g. skipped optimizers), ``trials`` (one row per finished trial: identity columns,
then one column per scalar field of :class:`~gradkit.bench.records.TrialOutcome`), ``curves``
(:class:`~gradkit.bench.records.CurvePoint` rows) and ``diagnostics``
(:class:`~gradkit.bench.records.Diagnostic` rows of ``--diagnose``).

``Store.create`` opens for writing (creating the file if needed); ``Store.open_existing``
opens read-only and never creates or alters anything (``gradkit report``). Both refuse a file
that is not a gradkit database of this schema version, with one line (a
:class:`~gradkit.errors.UsageError`). This module does not import torch.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import quote

from gradkit.bench.records import (
    IDENTITY_COLUMNS,
    OUTCOME_COLUMNS,
    CurvePoint,
    Diagnostic,
    TrialOutcome,
    TrialRecord,
)
from gradkit.errors import UsageError

#: Bumped whenever a table changes; a database of another version is refused, not migrated.
SCHEMA_VERSION = "2"


def _sql_type(annotation: str) -> str:
    base = "INTEGER" if annotation.startswith("int") else (
        "REAL" if annotation.startswith("float") else "TEXT")
    return base if "None" in annotation else f"{base} NOT NULL"


_OUTCOME_SQL = tuple(f"{f.name} {_sql_type(str(f.type))}" for f in fields(TrialOutcome)
                     if f.name in OUTCOME_COLUMNS)

#: table -> (column definitions, primary key)
_TABLES: dict[str, tuple[tuple[str, ...], str]] = {
    "meta": (("key TEXT", "value TEXT NOT NULL"), "key"),
    "workloads": (("suite TEXT NOT NULL", "version TEXT NOT NULL", "name TEXT NOT NULL",
                   "spec TEXT NOT NULL", "info TEXT NOT NULL", "position INTEGER NOT NULL"),
                  "suite, version, name"),
    "studies": (("suite TEXT NOT NULL", "version TEXT NOT NULL", "workload TEXT NOT NULL",
                 "optimizer TEXT NOT NULL", "space TEXT NOT NULL",
                 "torch_baseline INTEGER NOT NULL", "n_trials INTEGER NOT NULL",
                 "seeds TEXT NOT NULL"), "suite, version, workload, optimizer"),
    "notes": (("suite TEXT NOT NULL", "version TEXT NOT NULL", "note TEXT NOT NULL"),
              "suite, version, note"),
    "trials": (("key TEXT", "suite TEXT NOT NULL", "version TEXT NOT NULL",
                "workload TEXT NOT NULL", "optimizer TEXT NOT NULL", "hparams TEXT NOT NULL",
                "seed INTEGER NOT NULL", "phase TEXT NOT NULL", "trial_index INTEGER NOT NULL",
                *_OUTCOME_SQL, "finished_at TEXT NOT NULL"), "key"),
    "curves": (("key TEXT NOT NULL", "step INTEGER NOT NULL", "seconds REAL NOT NULL",
                "train_loss REAL", "val_loss REAL", "val_metric REAL"), "key, step"),
    "diagnostics": (("key TEXT NOT NULL", "step INTEGER NOT NULL", "name TEXT NOT NULL",
                     "value REAL"), "key, step, name"),
}
_TRIAL_COLUMNS = (*IDENTITY_COLUMNS, *OUTCOME_COLUMNS, "finished_at")


def _uri(path: Path, **params: str) -> str:
    """A SQLite ``file:`` URI for ``path`` (percent-escaped: ``#``, ``?``, ``%`` work)."""
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"file:{quote(str(path.resolve()), safe='/')}?{query}"


class Store:
    """A results database. Use :meth:`create` (read-write) or :meth:`open_existing` (read-only).

    Args:
        conn: an open connection to a database already checked by :func:`_check_schema`.
        path: the database file.
        readonly: whether ``conn`` was opened read-only.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, readonly: bool):
        self.conn, self.path, self.readonly = conn, path, readonly
        self.conn.row_factory = sqlite3.Row

    @classmethod
    def create(cls, path: str | Path) -> Store:
        """Open ``path`` for writing, creating the database if the file does not exist.

        An existing file must be a gradkit database of this schema version (else UsageError).
        """
        path = Path(path)
        is_new = not path.exists() or path.stat().st_size == 0
        conn = _connect(path, _uri(path, mode="rwc"))
        try:
            if not is_new:
                _check_schema(conn, path)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            with conn:
                for table, (columns, key) in _TABLES.items():
                    conn.execute(f"CREATE TABLE IF NOT EXISTS {table} "
                                 f"({', '.join(columns)}, PRIMARY KEY ({key}))")
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)",
                             (SCHEMA_VERSION,))
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise UsageError(f"cannot write results database {str(path)!r} ({exc})") from None
        except BaseException:
            conn.close()
            raise
        return cls(conn, path, readonly=False)

    @classmethod
    def open_existing(cls, path: str | Path) -> Store:
        """Open a database written by ``gradkit bench`` read-only; UsageError if it is not one.

        Works on a read-only file or directory. Never creates or alters a table.
        """
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"no results database at {str(path)!r} (run 'gradkit bench' first)")
        conn = _connect(path, _uri(path, mode="ro"))
        try:
            try:
                _check_schema(conn, path)
            except sqlite3.OperationalError:
                # A WAL database in a read-only directory: the shared-memory file cannot be
                # created. Nobody can be writing there, so read it as an immutable file.
                conn.close()
                conn = _connect(path, _uri(path, mode="ro", immutable="1"))
                _check_schema(conn, path)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise UsageError(f"{str(path)!r} is not a gradkit results database or is damaged "
                             f"({' '.join(str(exc).split())})") from None
        except BaseException:
            conn.close()
            raise
        return cls(conn, path, readonly=True)

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------------ writing
    def check_same_run(self, suite: str, version: str, arguments: dict[str, Any]) -> None:
        """UsageError if this database holds a run of ``suite`` made with other arguments.

        A database holds one run per suite version, so its report never mixes trials of
        different protocols (e.g. ``--trials 8`` then ``--trials 2``).
        """
        stored = self.meta(f"run:{suite}:{version}")
        if stored is None:
            return
        old = json.loads(stored)
        if old == arguments:
            return
        raise UsageError(
            f"{str(self.path)!r} holds a run of suite {suite!r} made with other arguments "
            f"({_differences(old, arguments)}); rerun with the same arguments to resume it, "
            "or choose another --out (or --db)")

    def declare(self, suite: str, version: str, workloads: list[tuple[str, str, dict]],
                studies: list[dict[str, Any]], notes: list[str],
                arguments: dict[str, Any] | None = None) -> None:
        """Record what a run is about to do (workloads, studies, notes, its ``arguments``
        for :meth:`check_same_run`) in one transaction.

        Notes of the suite version are replaced (they describe the latest run).
        """
        with self.conn:
            if arguments is not None:
                self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                  (f"run:{suite}:{version}",
                                   json.dumps(arguments, sort_keys=True)))
            for position, (name, spec, info) in enumerate(workloads):
                self.conn.execute(
                    "INSERT OR REPLACE INTO workloads VALUES (?,?,?,?,?,?)",
                    (suite, version, name, spec, json.dumps(info, sort_keys=True), position))
            for s in studies:
                self.conn.execute(
                    "INSERT OR REPLACE INTO studies VALUES (?,?,?,?,?,?,?,?)",
                    (suite, version, s["workload"], s["optimizer"], s["space"],
                     int(s["torch_baseline"]), s["n_trials"], json.dumps(s["seeds"])))
            self.conn.execute("DELETE FROM notes WHERE suite=? AND version=?", (suite, version))
            self.conn.executemany("INSERT OR IGNORE INTO notes VALUES (?,?,?)",
                                  [(suite, version, n) for n in notes])

    def record(self, task: Any, version: str, workload: str, optimizer: str,
               outcome: TrialOutcome) -> None:
        """Insert one finished trial with its curve and diagnostics atomically.

        ``task`` is a :class:`~gradkit.bench.runner.TrialTask` (``key``, ``suite``,
        ``hparams`` as canonical JSON, ``seed``, ``phase``, ``index``). No-op if the key exists.
        """
        row = (task.key, task.suite, version, workload, optimizer, task.hparams, task.seed,
               task.phase, task.index, *outcome.columns())
        marks = ",".join("?" * len(row))
        with self.conn:
            cur = self.conn.execute(
                f"INSERT OR IGNORE INTO trials ({','.join(_TRIAL_COLUMNS)}) "
                f"VALUES ({marks},datetime('now'))", row)
            if cur.rowcount:
                self.conn.executemany("INSERT OR REPLACE INTO curves VALUES (?,?,?,?,?,?)",
                                      [(task.key, *point) for point in outcome.curve])
                self.conn.executemany("INSERT OR REPLACE INTO diagnostics VALUES (?,?,?,?)",
                                      [(task.key, *d) for d in outcome.diagnostics])

    def set_meta(self, key: str, value: str) -> None:
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    # ------------------------------------------------------------------ reading
    def finished_keys(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT key FROM trials")}

    def suites(self) -> list[tuple[str, str]]:
        """(suite, version) pairs with declared workloads, most recently declared last."""
        rows = self.conn.execute(
            "SELECT suite, version, MAX(rowid) AS r FROM workloads GROUP BY suite, version "
            "ORDER BY r")
        return [(r["suite"], r["version"]) for r in rows]

    def workloads(self, suite: str, version: str) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT name, spec, info FROM workloads WHERE suite=? AND version=? "
            "ORDER BY position, name", (suite, version))
        return [{"name": r["name"], "spec": r["spec"], **json.loads(r["info"])} for r in rows]

    def studies(self, suite: str, version: str) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT * FROM studies WHERE suite=? AND version=? ORDER BY workload, optimizer",
            (suite, version))
        return [dict(r) | {"seeds": json.loads(r["seeds"])} for r in rows]

    def notes(self, suite: str, version: str) -> list[str]:
        rows = self.conn.execute(
            "SELECT note FROM notes WHERE suite=? AND version=? ORDER BY note", (suite, version))
        return [r[0] for r in rows]

    def trials(self, suite: str, version: str) -> list[TrialRecord]:
        """Every stored trial of a suite version (curves and diagnostics not included)."""
        rows = self.conn.execute(
            f"SELECT {','.join(_TRIAL_COLUMNS)} FROM trials WHERE suite=? AND version=? "
            "ORDER BY workload, optimizer, trial_index, seed, key", (suite, version))
        return [TrialRecord(**(dict(r) | {"hparams": json.loads(r["hparams"])})) for r in rows]

    def curves(self, keys: Iterable[str]) -> dict[str, list[CurvePoint]]:
        out: dict[str, list[CurvePoint]] = {}
        for key in keys:
            rows = self.conn.execute(
                f"SELECT {','.join(CurvePoint._fields)} FROM curves WHERE key=? ORDER BY step",
                (key,))
            out[key] = [CurvePoint(*r) for r in rows]
        return out

    def diagnostics(self, keys: Iterable[str]) -> dict[str, list[Diagnostic]]:
        """``--diagnose`` readings per trial key, by step then instrument name."""
        out: dict[str, list[Diagnostic]] = {}
        for key in keys:
            rows = self.conn.execute(
                "SELECT step, name, value FROM diagnostics WHERE key=? ORDER BY step, name",
                (key,))
            out[key] = [Diagnostic(*r) for r in rows]
        return out


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``"trials 4 -> 2; optimizers +lion, -sgd"``: what a rerun changed, briefly."""
    parts = []
    for field in sorted(set(old) | set(new)):
        a, b = old.get(field), new.get(field)
        if a == b:
            continue
        if isinstance(a, list) and a and isinstance(a[0], dict):
            names_a = {x["name"]: x for x in a}
            names_b = {x["name"]: x for x in b or []}
            added = [n for n in names_b if n not in names_a]
            removed = [n for n in names_a if n not in names_b]
            changed = [n for n in names_b if n in names_a and names_a[n] != names_b[n]]
            items = [f"+{n}" for n in added] + [f"-{n}" for n in removed] + \
                [f"{n} changed" for n in changed]
            parts.append(f"{field} {', '.join(items) or 'reordered'}")
        else:
            parts.append(f"{field} {json.dumps(a)} -> {json.dumps(b)}")
    return "; ".join(parts)


class RunLock:
    """An exclusive ``fcntl`` lock on ``DB.lock`` for the duration of a run.

    A second ``gradkit bench`` on the same database is refused (UsageError naming the pid
    holding it) instead of interleaving with the first. The lock file is left in place
    (deleting it would race with a process about to lock it); the kernel drops the lock when
    the holder exits, even after ``kill -9``. No-op where ``fcntl`` does not exist.
    """

    def __init__(self, db: Path):
        self.path = db.with_name(db.name + ".lock")
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not POSIX
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(f"another gradkit bench (pid {holder}) is running on "
                             f"{str(self.path.with_suffix(''))!r}; wait for it to finish or "
                             "choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
            self.fd = None


def _connect(path: Path, uri: str) -> sqlite3.Connection:
    try:
        return sqlite3.connect(uri, uri=True, timeout=30.0)
    except sqlite3.Error as exc:
        raise UsageError(f"cannot open results database {str(path)!r} ({exc})") from None


def _check_schema(conn: sqlite3.Connection, path: Path) -> None:
    """UsageError unless ``conn`` holds an intact gradkit database of :data:`SCHEMA_VERSION`.

    sqlite3.OperationalError (e.g. an unopenable WAL) is left to the caller.
    """
    name = str(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "meta" not in tables:
        raise UsageError(f"{name!r} is not a gradkit results database")
    row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    if row is None:
        raise UsageError(f"{name!r} is not a gradkit results database")
    if row[0] != SCHEMA_VERSION:
        raise UsageError(
            f"{name!r} has results schema version {row[0]!r}, this gradkit reads version "
            f"{SCHEMA_VERSION!r}; rerun 'gradkit bench' with another --out")
    for table, (columns, _) in _TABLES.items():
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        missing = [c.split()[0] for c in columns if c.split()[0] not in have]
        if missing:
            raise UsageError(f"{name!r} is a damaged gradkit results database (table {table!r} "
                             f"lacks {', '.join(missing)})")
    problems = [r[0] for r in conn.execute("PRAGMA quick_check")]
    if problems != ["ok"]:
        first = " ".join(problems[0].split())  # SQLite's report spans lines
        raise UsageError(f"{name!r} is a damaged gradkit results database ({first})")

