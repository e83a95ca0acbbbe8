"""Drive a suite: schedule tuning trials, select per study, schedule seed reruns, store all.

Resuming is the normal path: the keys already in the database are skipped (their outcomes are
read back for selection), so rerunning a killed command completes exactly the missing trials.
"""

from __future__ import annotations

import json
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field, replace
from typing import Any

from gradkit.bench.executors import WorkerStartError
from gradkit.bench.protocol import Study, select
from gradkit.bench.records import TrialOutcome, TrialRecord
from gradkit.bench.runner import TrialTask
from gradkit.bench.store import Store
from gradkit.bench.suites import Suite
from gradkit.errors import GradkitError


class WorkerError(GradkitError):
    """The run cannot go on: a worker process could not start. (A trial whose worker dies or
    times out is an outcome, ``crashed`` or ``failed``, and the run goes on.)"""


@dataclass
class RunStats:
    skipped: int = 0
    ran: int = 0
    statuses: dict[str, int] = field(default_factory=dict)


class _Progress:
    """Progress of a run.

    On a terminal: a rich progress bar on stderr. Otherwise (``make bench > log``, CI): one
    plain line per finished trial on stdout, ``[  12/504] workload / optimizer / seed 0: ok``.
    Nothing when quiet.
    """

    def __init__(self, total: int, quiet: bool):
        self.bar, self.quiet, self.total, self.done = None, quiet, total, 0
        self.plain = not quiet and not sys.stdout.isatty()
        if not quiet and not self.plain and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(),
                                TextColumn("{task.description}"),
                                console=Console(stderr=True), transient=False)
            self.bar.start()
            self.task = self.bar.add_task("", total=total)

    def advance(self, text: str, status: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=text)
        elif self.plain:
            width = len(str(self.total))
            print(f"[{self.done:>{width}}/{self.total}] {text}: {status}", flush=True)

    def grow(self, extra: int) -> None:
        self.total += extra
        if self.bar is not None:
            self.bar.update(self.task, total=self.total)

    def log(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text, markup=False, highlight=False)
        elif not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run_studies(store: Store, suite: Suite, studies: list[Study], executor: Any, *,
                quiet: bool = False,
                on_start: Callable[[int, int], None] | None = None) -> RunStats:
    """Run every missing trial of ``studies`` on ``executor``, recording each in ``store``.

    ``on_start(to_run, already_finished)`` is called once, before the first trial starts.
    """
    known: dict[str, TrialRecord] = {r.key: r for r in store.trials(suite.name,
                                                                    suite.version)}
    stats = RunStats()
    queue: deque[tuple[int, TrialTask]] = deque()
    waiting: dict[int, set[str]] = {}
    for i, study in enumerate(studies):
        waiting[i] = {t.key for t in study.tune if t.key not in known}
        queue.extend((i, t) for t in study.tune if t.key not in known)
        stats.skipped += len(study.tune) - len(waiting[i])

    def seed_tasks(i: int) -> list[tuple[int, TrialTask]]:
        study = studies[i]
        rows = [replace(known[t.key], trial_index=t.index) for t in study.tune]
        best = select(rows, study.entry.workload.higher_is_better)
        chosen = next(t for t in study.tune if t.key == best.key)
        tasks = study.seed_tasks(chosen)
        stats.skipped += sum(t.key in known for t in tasks)
        return [(i, t) for t in tasks if t.key not in known]

    extra_pending = 0
    for i in range(len(studies)):
        if waiting[i]:
            extra_pending += len(suite.seeds) - 1
        else:
            queue.extend(seed_tasks(i))
    if on_start is not None:
        on_start(len(queue) + extra_pending, stats.skipped)
    progress = _Progress(len(queue) + extra_pending, quiet)
    in_flight: dict[Future, tuple[int, TrialTask]] = {}
    try:
        while queue or in_flight:
            while queue and len(in_flight) < executor.capacity:
                i, task = queue.popleft()
                in_flight[executor.submit(task)] = (i, task)
            done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: in_flight[f][1].key):
                i, task = in_flight.pop(future)
                try:
                    outcome = future.result()
                except WorkerStartError as exc:
                    raise WorkerError(
                        f"{exc}; finished trials are saved, rerun the same command to "
                        "resume") from exc
                except Exception as exc:  # e.g. a Ray worker lost: the trial, not the run
                    outcome = TrialOutcome("crashed", error=f"{type(exc).__name__}: {exc}"[:500])
                _record(store, suite, studies[i], task, outcome, known, stats, progress)
                if task.phase == "tune":
                    waiting[i].discard(task.key)
                    if not waiting[i]:
                        new = seed_tasks(i)
                        progress.grow(len(new) - (len(suite.seeds) - 1))
                        queue.extend(new)
    finally:
        progress.close()
    return stats


def _record(store: Store, suite: Suite, study: Study, task: TrialTask, outcome: TrialOutcome,
            known: dict[str, TrialRecord], stats: RunStats, progress: _Progress) -> None:
    store.record(task, suite.version, study.entry.name, study.optimizer.name, outcome)
    known[task.key] = TrialRecord.from_outcome(
        outcome, key=task.key, suite=task.suite, version=suite.version,
        workload=study.entry.name, optimizer=study.optimizer.name,
        hparams=json.loads(task.hparams), seed=task.seed, phase=task.phase,
        trial_index=task.index)
    stats.ran += 1
    stats.statuses[outcome.status] = stats.statuses.get(outcome.status, 0) + 1
    label = (f"{study.entry.name} / {study.optimizer.name} / trial {task.index} / "
             f"seed {task.seed}")
    progress.advance(label, outcome.status)
    if outcome.status in ("failed", "crashed"):
        progress.log(f"trial {outcome.status}: {label}: {outcome.error}")
