"""Where trials run: in-process, in local processes (``--jobs N``) or on Ray (``--backend ray``).

Every executor has ``capacity`` (how many trials to keep in flight), ``submit(task)`` returning
a :class:`concurrent.futures.Future` of the :class:`~gradkit.bench.records.TrialOutcome`,
``close()`` and ``abort()``. Workers
resolve the task's workload and optimizer themselves and run single-threaded torch, so the same
trial gives the same numbers whichever executor ran it.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future
from multiprocessing.connection import wait as connection_wait
from typing import Any

from gradkit.bench._worker import worker_main
from gradkit.bench.records import TrialOutcome
from gradkit.bench.runner import TrialTask, run_task
from gradkit.errors import GradkitError, require_extra


class SerialExecutor:
    """Runs each trial in this process when it is submitted (``--in-process``: for debugging;
    no trial timeout, and a trial that kills its process ends the run)."""

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


class _Worker:
    """One spawned worker process and the parent's end of its pipe."""

    def __init__(self, ctx: Any):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, args=(child, os.getpid()), daemon=True)
        self.process.start()
        child.close()
        self.ready = False
        self.job: tuple[TrialTask, Future] | None = None
        self.deadline = math.inf

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


def _death(process: Any) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class ProcessExecutor:
    """``jobs`` spawned worker processes, each running one trial at a time.

    Spawn (not fork): safe with torch, the same on every OS. A trial that runs longer than
    ``trial_timeout`` seconds (its worker is killed) is a ``failed`` outcome; a worker that
    dies (segfault, ``os._exit``, out of memory) gives a ``crashed`` outcome. Either way the
    worker is replaced and the suite goes on. Workers die with the parent (see
    :mod:`gradkit.bench._worker`).
    """

    def __init__(self, jobs: int, trial_timeout: float | None = None):
        self.capacity = 2 * jobs
        self.timeout = trial_timeout if trial_timeout else math.inf
        self._ctx = multiprocessing.get_context("spawn")
        self._workers = [_Worker(self._ctx) for _ in range(jobs)]
        self._queue: deque[tuple[TrialTask, Future]] = deque()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="gradkit-workers", daemon=True)
        self._thread.start()

    def submit(self, task: TrialTask) -> Future:
        future: Future = Future()
        with self._lock:
            self._queue.append((task, future))
        self._wake_w.send(None)
        return future

    # ------------------------------------------------------------ the dispatcher thread
    def _loop(self) -> None:
        while not self._stop:
            self._dispatch()
            now = time.monotonic()
            busy = [w for w in self._workers if w.job is not None]
            timeout = min([w.deadline - now for w in busy], default=math.inf)
            handles: list[Any] = [self._wake_r]
            for w in self._workers:
                handles += [w.conn, w.process.sentinel]
            ready = connection_wait(handles, timeout=None if timeout == math.inf
                                    else max(0.0, min(timeout, 3600.0)))
            if self._wake_r in ready:
                while self._wake_r.poll():
                    self._wake_r.recv()
            for i, w in enumerate(list(self._workers)):
                self._service(i, w, ready)

    def _dispatch(self) -> None:
        with self._lock:
            for w in self._workers:
                if w.ready and w.job is None and self._queue:
                    w.job = self._queue.popleft()
                    w.deadline = time.monotonic() + self.timeout
                    w.conn.send(w.job[0])

    def _service(self, i: int, w: _Worker, ready: list[Any]) -> None:
        if w.conn in ready:
            try:
                message = w.conn.recv()
            except (EOFError, OSError):
                message = None
            if message == "ready":
                w.ready = True
                return
            if isinstance(message, TrialOutcome) and w.job is not None:
                w.job[1].set_result(message)
                w.job, w.deadline = None, math.inf
                return
        if w.job is not None and time.monotonic() >= w.deadline:
            future = w.job[1]
            w.kill()
            future.set_result(TrialOutcome("failed", error=(
                f"timed out: still running after {self.timeout:g} s (--trial-timeout); "
                "the worker was killed")))
            self._replace(i)
        elif not w.process.is_alive() and not self._stop:
            w.process.join()
            why = _death(w.process)
            w.kill()
            if w.job is not None:
                w.job[1].set_result(TrialOutcome("crashed", error=(
                    f"the worker process died while running this trial ({why})")))
            elif not w.ready:
                # Died before serving anything: an environment problem, not a trial outcome.
                self._fail_all(WorkerStartError(f"a worker process could not start ({why})"))
                return
            self._replace(i)

    def _replace(self, i: int) -> None:
        # Started from this dispatcher thread: its death signal (PR_SET_PDEATHSIG) fires when
        # this thread ends, i.e. at close()/abort(), when no trial is left to run.
        self._workers[i] = _Worker(self._ctx)

    def _fail_all(self, exc: BaseException) -> None:
        self._stop = True
        with self._lock:
            jobs = [w.job for w in self._workers if w.job] + list(self._queue)
            self._queue.clear()
        for _, future in jobs:
            if not future.done():
                future.set_exception(exc)

    # ------------------------------------------------------------ shutting down
    def close(self) -> None:
        self._stop = True
        self._wake_w.send(None)
        self._thread.join()
        for w in self._workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in self._workers:
            w.process.join(timeout=5)
            w.kill()

    def abort(self) -> None:
        """Stop now (interrupt/error): kill the workers; stored trials are kept."""
        self._stop = True
        try:
            self._wake_w.send(None)
        except OSError:
            pass
        self._thread.join(timeout=5)
        for w in self._workers:
            w.kill()
        self._fail_all(WorkerStartError("aborted"))


class WorkerStartError(GradkitError):
    """A worker process died before it could run any trial."""


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


def make_executor(backend: str, jobs: int, address: str | None = None, *,
                  trial_timeout: float | None = None, in_process: bool = False):
    """The executor for ``--backend`` / ``--jobs`` / ``--trial-timeout`` / ``--in-process``."""
    if backend == "ray":
        return RayExecutor(address, jobs)
    if in_process:
        return SerialExecutor()
    return ProcessExecutor(jobs, trial_timeout)
