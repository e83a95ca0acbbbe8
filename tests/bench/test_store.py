"""The results store: typed rows, read-only opening, odd paths, foreign and damaged files."""

import hashlib
import os
import shlex
import shutil
import sqlite3
import stat
import subprocess
import sys

import pytest

from gradkit.bench.records import CurvePoint, TrialOutcome
from gradkit.bench.runner import TrialTask
from gradkit.bench.store import SCHEMA_VERSION, Store
from gradkit.errors import UsageError


def _filled(path, n=40):
    store = Store.create(path)
    store.declare("s", "1", [("w", "w", {"metric": "m", "higher_is_better": True})], [], [])
    for k in range(n):
        task = TrialTask(f"k{k}", "s", "w", "{}", "o", '{"lr":0.1}', k, "tune", k)
        curve = tuple(CurvePoint(s, 0.1 * s, 1.0, 0.5, 0.9) for s in range(20))
        store.record(task, "1", "w", "o", TrialOutcome("ok", steps_done=20, curve=curve,
                                                       error="x" * 200))
    store.close()
    return path


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["a#b", "q?x=1", "p%20c", "sp ace"])
def test_paths_with_uri_characters_work(tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    db = _filled(folder / f"{name}.sqlite", n=2)
    assert not (tmp_path / "a").exists() and len(list(tmp_path.iterdir())) == 1
    store = Store.create(db)  # reopening for writing (resume) finds the same database
    assert store.finished_keys() == {"k0", "k1"}
    store.close()
    store = Store.open_existing(db)
    assert len(store.trials("s", "1")) == 2
    store.close()


def test_open_existing_never_writes(tmp_path):
    db = _filled(tmp_path / "r.sqlite")
    before = _digest(db)
    store = Store.open_existing(db)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        store.set_meta("x", "y")
    store.close()
    assert _digest(db) == before


def test_read_only_file_is_readable(tmp_path):
    db = _filled(tmp_path / "r.sqlite")
    db.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)  # chmod 444
    store = Store.open_existing(db)
    assert len(store.trials("s", "1")) == 40
    store.close()


_READ = ("import sys; from gradkit.bench.store import Store; "
         "s = Store.open_existing(sys.argv[1]); print(len(s.curves(['k3'])['k3']))")


def test_wal_database_in_a_read_only_directory_is_readable(tmp_path):
    # A read-only mount (root ignores chmod, so a real one, in a private mount namespace):
    # SQLite cannot create the WAL's shared-memory file there.
    folder = tmp_path / "ro"
    folder.mkdir()
    db = _filled(folder / "r.sqlite")
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare (user and mount namespaces) for a read-only mount")
    script = (f"mount --bind {shlex.quote(str(folder))} {shlex.quote(str(folder))} && "
              f"mount -o remount,ro,bind {shlex.quote(str(folder))} && "
              f"touch {shlex.quote(str(folder))}/probe 2>/dev/null && echo writable; "
              f"{shlex.quote(sys.executable)} -c {shlex.quote(_READ)} {shlex.quote(str(db))}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        os.path.abspath(p) for p in sys.path)}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["20"]  # not writable, and all 20 points read


def _usage_error(path, *fragments):
    with pytest.raises(UsageError) as info:
        Store.open_existing(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    with pytest.raises(UsageError):  # the writer refuses it too, before creating anything
        Store.create(path).close()


def test_unknown_schema_version_is_refused(tmp_path):
    db = _filled(tmp_path / "r.sqlite", n=1)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE meta SET value='99' WHERE key='schema'")
    conn.commit()
    conn.close()
    before = _digest(db)
    _usage_error(db, "schema version '99'", f"version {SCHEMA_VERSION!r}")
    assert _digest(db) == before


def test_dropped_column_is_refused(tmp_path):
    db = _filled(tmp_path / "r.sqlite", n=1)
    conn = sqlite3.connect(db)
    conn.execute("ALTER TABLE trials DROP COLUMN final_val_metric")
    conn.commit()
    conn.close()
    _usage_error(db, "damaged", "final_val_metric")


def test_garbled_page_is_refused(tmp_path):
    db = _filled(tmp_path / "r.sqlite")
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    data = bytearray(db.read_bytes())
    assert len(data) > 4 * page
    data[3 * page + 8: 4 * page - 8] = os.urandom(page - 16)  # a b-tree page, not the header
    db.write_bytes(bytes(data))
    _usage_error(db, "r.sqlite")


def test_schema_1_database_is_refused(tmp_path):
    db = tmp_path / "old.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("INSERT INTO meta VALUES ('schema', '1')")
    conn.commit()
    conn.close()
    _usage_error(db, "schema version '1'")
