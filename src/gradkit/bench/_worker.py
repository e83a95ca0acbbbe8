"""The entry point of a benchmark worker process; deliberately cheap to import.

A spawned worker unpickles :func:`worker_main` (importing only this module and the stdlib),
then, *before* the slow ``import torch``, makes sure it cannot outlive its parent:

1. On Linux, ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills the worker the moment the
   parent dies, whatever the worker is doing (even stuck in C code).
2. Then it compares ``os.getppid()`` with the parent pid captured *before* the spawn: if the
   parent already died during the worker's start-up (before step 1 took effect), it exits.
3. Elsewhere (no ``prctl``), a daemon thread polls ``os.getppid()`` twice a second.

Only then does it import the runner (torch) and serve trials over its pipe: it sends
``"ready"``, then for every :class:`~gradkit.bench.runner.TrialTask` received sends back the
:class:`~gradkit.bench.records.TrialOutcome`. ``None`` or a closed pipe ends it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_poll_parent, args=(parent_pid,), daemon=True).start()


def _poll_parent(parent_pid: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(1)


def worker_main(conn: Any, parent_pid: int) -> None:
    """Serve trials on ``conn`` until told to stop (runs in the spawned worker process)."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    os.environ["OMP_NUM_THREADS"] = "1"
    from gradkit.bench.runner import run_task, warm_up

    warm_up()  # torch's lazy imports, before any trial's clock (--trial-timeout) starts
    conn.send("ready")
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        conn.send(run_task(task))
