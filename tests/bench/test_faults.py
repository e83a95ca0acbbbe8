"""Real faults in real worker processes: a hanging optimizer, a worker that dies, a parent
killed with SIGKILL in its first seconds (no worker may survive it)."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bench._helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
USER = "tests.bench.fixture_user"


@pytest.mark.slow  # a timeout plus three worker restarts (each imports torch): ~1 minute
def test_hanging_and_dying_optimizers_are_recorded_and_the_suite_goes_on(tmp_path):
    out = tmp_path / "faults"
    code, stdout, stderr = run_cli(
        "bench", "--suite", "tiny", "--trials", "0", "--seeds", "1", "--jobs", "2",
        "--trial-timeout", "8", "--quiet", "--no-report", "--out", str(out),
        "--workload", f"{USER}:make_workload", "--optimizer", f"{USER}:Hanging",
        "--optimizer", f"{USER}:KillsItsProcess", "--optimizer", f"{USER}:Segfaults",
        "--optimizer", "sgd")
    assert code == 0, stderr
    with sqlite3.connect(out / "results.sqlite") as conn:
        rows = dict((o.split(":")[-1], (s, e)) for o, s, e in conn.execute(
            "SELECT optimizer, status, error FROM trials"))
    assert rows["sgd"] == ("ok", None)
    assert rows["Hanging"][0] == "failed" and "timed out" in rows["Hanging"][1]
    assert "--trial-timeout" in rows["Hanging"][1]
    assert rows["KillsItsProcess"] == (
        "crashed", "the worker process died while running this trial (exit code 3)")
    assert rows["Segfaults"][0] == "crashed" and "SIGSEGV" in rows["Segfaults"][1]
    assert "ran 4 (2 crashed, 1 failed, 1 ok)" in stdout


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_no_worker_outlives_a_parent_killed_in_its_first_seconds(tmp_path):
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc to find the worker processes")
    command = [sys.executable, "-m", "gradkit.cli", "bench", "--suite", "tiny", "--jobs", "2",
               "--quiet", "--out", str(tmp_path / "o")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    parent = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    deadline = time.monotonic() + 60
    while len(workers) < 2 and time.monotonic() < deadline:  # spawned, still importing torch
        workers = _children(parent.pid)
        time.sleep(0.01)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    assert len(workers) >= 2, "the workers were not started"
    # At once (the kernel's parent-death signal), not after the worker's torch import, which
    # takes seconds: an orphan that waits for its import to notice holds ~700 MB meanwhile.
    deadline = time.monotonic() + 2
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [w for w in workers if _alive(w)]
    for w in survivors:  # do not leave them behind if the test fails
        os.kill(w, signal.SIGKILL)
    assert not survivors
