"""SQLite results store (stdlib ``sqlite3``, WAL journal).

Only the parent process writes. Each finished trial (its row and all its curve points) is
inserted in one transaction, so a run killed at any moment (even ``kill -9``) leaves a
consistent database: a trial is either fully present or absent. Rerunning the same command
skips the keys already present and runs the rest.

Tables: ``meta`` (schema version), ``workloads`` (declared fields per suite version),
``studies`` (workload × optimizer with its declared search space), ``notes`` (e.g. skipped
optimizers), ``trials`` (one row per finished trial) and ``curves`` (evaluation points).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gradkit.errors import UsageError

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS workloads (
    suite TEXT NOT NULL, version TEXT NOT NULL, name TEXT NOT NULL, spec TEXT NOT NULL,
    info TEXT NOT NULL, position INTEGER NOT NULL, PRIMARY KEY (suite, version, name));
CREATE TABLE IF NOT EXISTS studies (
    suite TEXT NOT NULL, version TEXT NOT NULL, workload TEXT NOT NULL,
    optimizer TEXT NOT NULL, space TEXT NOT NULL, torch_baseline INTEGER NOT NULL,
    n_trials INTEGER NOT NULL, seeds TEXT NOT NULL,
    PRIMARY KEY (suite, version, workload, optimizer));
CREATE TABLE IF NOT EXISTS notes (
    suite TEXT NOT NULL, version TEXT NOT NULL, note TEXT NOT NULL,
    PRIMARY KEY (suite, version, note));
CREATE TABLE IF NOT EXISTS trials (
    key TEXT PRIMARY KEY, suite TEXT NOT NULL, version TEXT NOT NULL, workload TEXT NOT NULL,
    optimizer TEXT NOT NULL, hparams TEXT NOT NULL, seed INTEGER NOT NULL,
    phase TEXT NOT NULL, trial_index INTEGER NOT NULL, status TEXT NOT NULL,
    steps_to_target INTEGER, seconds_to_target REAL, final_train_loss REAL,
    final_val_loss REAL, final_val_metric REAL, final_test_loss REAL, final_test_metric REAL,
    train_seconds REAL, steps_done INTEGER, error TEXT, finished_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS curves (
    key TEXT NOT NULL, step INTEGER NOT NULL, seconds REAL NOT NULL, train_loss REAL,
    val_loss REAL, val_metric REAL, PRIMARY KEY (key, step));
"""

_OUTCOME_FIELDS = ("status", "steps_to_target", "seconds_to_target", "final_train_loss",
                   "final_val_loss", "final_val_metric", "final_test_loss", "final_test_metric",
                   "train_seconds", "steps_done", "error")


class Store:
    """A results database; ``Store(path)`` creates it, ``Store.open_existing`` does not."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.conn = sqlite3.connect(str(self.path), timeout=30.0)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        with self.conn:
            self.conn.executescript(_SCHEMA)
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))

    @classmethod
    def open_existing(cls, path: str | Path) -> Store:
        """Open a database written by ``gradkit bench``; UsageError if it is not one."""
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"no results database at {str(path)!r} (run 'gradkit bench' first)")
        try:
            probe = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                row = probe.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            finally:
                probe.close()
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"{str(path)!r} is not a gradkit results database ({exc})") from None
        if row is None:
            raise UsageError(f"{str(path)!r} is not a gradkit results database")
        return cls(path)

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------------ writing
    def declare(self, suite: str, version: str, workloads: list[tuple[str, str, dict]],
                studies: list[dict[str, Any]], notes: list[str]) -> None:
        """Record what a run is about to do (workloads, studies, notes) in one transaction.

        Notes of the suite version are replaced (they describe the latest run).
        """
        with self.conn:
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

    def record(self, task: dict[str, Any], version: str, workload: str, optimizer: str,
               outcome: dict[str, Any]) -> None:
        """Insert one finished trial and its curve atomically (no-op if the key exists)."""
        row = (task["key"], task["suite"], version, workload, optimizer, task["hparams"],
               task["seed"], task["phase"], task["index"],
               *(outcome[f] for f in _OUTCOME_FIELDS))
        with self.conn:
            cur = self.conn.execute(
                "INSERT OR IGNORE INTO trials VALUES "
                "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,datetime('now'))", row)
            if cur.rowcount:
                self.conn.executemany(
                    "INSERT OR REPLACE INTO curves VALUES (?,?,?,?,?,?)",
                    [(task["key"], *point) for point in outcome["curve"]])

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

    def trials(self, suite: str, version: str) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT * FROM trials WHERE suite=? AND version=? "
            "ORDER BY workload, optimizer, trial_index, seed, key", (suite, version))
        return [dict(r) | {"hparams": json.loads(r["hparams"])} for r in rows]

    def curves(self, keys: Iterable[str]) -> dict[str, list[tuple]]:
        out: dict[str, list[tuple]] = {}
        for key in keys:
            rows = self.conn.execute(
                "SELECT step, seconds, train_loss, val_loss, val_metric FROM curves "
                "WHERE key=? ORDER BY step", (key,))
            out[key] = [tuple(r) for r in rows]
        return out
