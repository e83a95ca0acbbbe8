"""Where trials run: in-process, in local processes (``--jobs N``) or on Ray (``--backend ray``).

Every executor has ``capacity`` (how many trials to keep in flight), ``submit(task)`` returning
a :class:`concurrent.futures.Future` of the outcome dict, ``close()`` and ``abort()``. Workers
resolve the task's workload and optimizer themselves and run single-threaded torch, so the same
trial gives the same numbers whichever executor ran it.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from gradkit.bench.runner import TrialTask, run_task
from gradkit.errors import require_extra


class SerialExecutor:
    """Runs each trial in this process when it is submitted."""

    capacity = 1

    def __init__(self) -> None:
        import torch

        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def submit(self, task: TrialTask) -> Future:
        future: Future = Future()
        future.set_result(run_task(task))
        return future

    def close(self) -> None:
        import torch

        torch.set_num_threads(self._threads)

    abort = close


def _exit_with_parent(parent: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:  # the parent died (e.g. kill -9): do not linger
            os._exit(1)


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    os.environ["OMP_NUM_THREADS"] = "1"
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    import torch

    torch.set_num_threads(1)


class ProcessExecutor:
    """A pool of ``jobs`` spawned processes (spawn: safe with torch, same on every OS)."""

    def __init__(self, jobs: int):
        self.capacity = 2 * jobs
        self._pool = ProcessPoolExecutor(
            max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker)

    def submit(self, task: TrialTask) -> Future:
        return self._pool.submit(run_task, task)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def abort(self) -> None:
        """Stop without waiting (interrupt/error); running trials are lost, stored ones kept."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class RayExecutor:
    """Runs trials as Ray tasks (``ray.init(address=...)``; ``None`` starts a local instance).

    Requires the ``gradkit[ray]`` extra; gradkit (and any user ``module:attr``) must be
    importable on the cluster's workers.
    """

    def __init__(self, address: str | None, jobs: int | None = None):
        self.ray = require_extra("ray", "ray", "--backend ray")
        self._owned = not self.ray.is_initialized()
        if self._owned:
            kwargs: dict[str, Any] = {"address": address, "include_dashboard": False,
                                      "log_to_driver": False}
            if address is None and jobs:
                kwargs["num_cpus"] = jobs
            self.ray.init(**kwargs)
        cpus = int(self.ray.cluster_resources().get("CPU", 1))
        self.capacity = 2 * max(1, cpus)
        self._remote = self.ray.remote(num_cpus=1)(run_task)

    def submit(self, task: TrialTask) -> Future:
        return self._remote.remote(task).future()

    def close(self) -> None:
        if self._owned:
            self.ray.shutdown()

    abort = close


def check_ray_available() -> None:
    """Raise MissingExtraError (one line: pip install 'gradkit[ray]') if ray is missing."""
    require_extra("ray", "ray", "--backend ray")


def make_executor(backend: str, jobs: int, address: str | None = None):
    if backend == "ray":
        return RayExecutor(address, jobs)
    if jobs <= 1:
        return SerialExecutor()
    return ProcessExecutor(jobs)
