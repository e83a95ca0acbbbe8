"""kill -9 in the middle of a run, rerun the same command: nothing duplicated or missing, and
the report has the same content as an uninterrupted run (step-based columns; see
gradkit.bench.report for why wall-clock columns are excluded)."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.bench._helpers import report_content, run_cli

ROOT = Path(__file__).resolve().parents[2]
TOTAL = 16  # 2 workloads x 2 optimizers x (3 tuning trials + 1 extra seed)


def _command(out: Path) -> list[str]:
    return [sys.executable, "-m", "gradkit.cli", "bench", "--suite", "tiny",
            "--workload", "tests.bench.fixture_user:make_slow_workload", "--workload", "quadratic",
            "--optimizer", "sgd", "--optimizer", "adam", "--jobs", "1", "--quiet",
            "--out", str(out)]


def _env() -> dict[str, str]:
    # this checkout's src first: a relative or missing PYTHONPATH must not let the child
    # import another gradkit (e.g. an editable install of a different checkout)
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path,
            "GRADKIT_TEST_SLEEP": "0.01"}


def _count(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return conn.execute("SELECT COUNT(*) FROM trials").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def _curve_lengths(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT t.key, COUNT(c.step) FROM trials t LEFT JOIN curves c "
                            "ON c.key = t.key GROUP BY t.key").fetchall()
    return dict(rows)


def test_kill_9_then_rerun_completes_exactly_the_missing_trials(tmp_path, monkeypatch):
    out = tmp_path / "killed"
    db = out / "results.sqlite"
    proc = subprocess.Popen(_command(out), cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while _count(db) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = _count(db)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert 3 <= done_at_kill < TOTAL  # killed mid-run, after some trials finished
    assert not (out / "report").exists()

    resumed = subprocess.run(_command(out), cwd=tmp_path, env=_env(), capture_output=True,
                             text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"ran {TOTAL - done_at_kill} " in resumed.stdout
    assert f"{done_at_kill} already finished" in resumed.stdout

    # the uninterrupted reference run, in this process (the sleep does not change outcomes)
    monkeypatch.setenv("GRADKIT_TEST_SLEEP", "0")
    clean = tmp_path / "clean"
    code, _, stderr = run_cli(*_command(clean)[3:])
    assert code == 0, stderr

    killed_curves, clean_curves = _curve_lengths(db), _curve_lengths(clean / "results.sqlite")
    assert len(killed_curves) == TOTAL  # primary key: no duplicates; count: none missing
    assert killed_curves == clean_curves  # same trial keys, each with its complete curve
    assert report_content(out / "report") == report_content(clean / "report")
