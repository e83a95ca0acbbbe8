"""The tuning protocol: which trials a study consists of and which configuration wins.

A *study* is one (workload, optimizer) pair of a suite. Its *tuning* trials are the defaults
configuration (index 0) and ``n_trials`` quasi-random configurations (indices 1..n), all at
``seeds[0]``. The selected configuration is rerun at the remaining seeds (*seed* trials).
Selection is on validation only: finished before diverged/failed, then fewest steps to the
validation target (a miss is infinite), then best final validation metric, then lowest index
(:func:`gradkit.bench.scoring.select`, which ``gradkit report`` uses without torch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from gradkit.bench.optimizers import OptimizerSpec
from gradkit.bench.runner import TrialTask, canonical_json, trial_key
from gradkit.bench.scoring import select, selection_key  # noqa: F401  (re-exported)
from gradkit.bench.suites import Suite
from gradkit.bench.workloads import Workload, describe


@dataclass
class WorkloadEntry:
    """A resolved workload with the spec string and size overrides that rebuild it."""

    spec: str
    overrides: dict[str, Any]
    workload: Workload
    device: str = "cpu"

    @property
    def name(self) -> str:
        return self.workload.name

    def identity(self) -> dict[str, Any]:
        """What makes this workload's trials comparable (part of every trial key)."""
        identity = {"spec": self.spec, "overrides": self.overrides, **describe(self.workload)}
        if self.device != "cpu":  # CPU keys stay those of runs made before --device existed
            identity["device"] = self.device
        return identity


@dataclass
class Study:
    suite: Suite
    entry: WorkloadEntry
    optimizer: OptimizerSpec
    tune: list[TrialTask] = field(default_factory=list)
    diagnose: tuple[str, ...] = ()  # instruments read at evaluation points (not in the key)

    def task(self, hparams: dict[str, Any], seed: int, phase: str, index: int) -> TrialTask:
        key = trial_key(self.suite.name, self.suite.version, self.entry.identity(),
                        self.optimizer.name, hparams, seed)
        return TrialTask(key, self.suite.name, self.entry.spec,
                         canonical_json(self.entry.overrides), self.optimizer.name,
                         canonical_json(hparams), seed, phase, index, self.entry.device,
                         self.diagnose)

    def seed_tasks(self, selected: TrialTask) -> list[TrialTask]:
        hparams = json.loads(selected.hparams)
        return [self.task(hparams, s, "seed", selected.index) for s in self.suite.seeds
                if s != selected.seed]


def build_studies(suite: Suite, entries: list[WorkloadEntry],
                  optimizers: list[OptimizerSpec], diagnose: tuple[str, ...] = ()
                  ) -> list[Study]:
    studies = []
    for entry in entries:
        for spec in optimizers:
            study = Study(suite, entry, spec, diagnose=diagnose)
            seen: set[str] = set()
            for index, hparams in enumerate(spec.configs(suite.n_trials, suite.search_seed)):
                task = study.task(hparams, suite.seeds[0], "tune", index)
                if task.key not in seen:  # identical configurations are one trial
                    seen.add(task.key)
                    study.tune.append(task)
            studies.append(study)
    return studies


def run_arguments(suite: Suite, entries: list[WorkloadEntry],
                  optimizers: list[OptimizerSpec]) -> dict[str, Any]:
    """Everything a run's trials depend on, as stored with the run: a rerun into the same
    database must have the same (see :meth:`gradkit.bench.store.Store.check_same_run`)."""
    return {
        "suite": suite.name, "version": suite.version, "trials": suite.n_trials,
        "seeds": list(suite.seeds), "search_seed": suite.search_seed,
        "workloads": [{"name": e.name, "spec": e.spec, "identity": e.identity()}
                      for e in entries],
        "optimizers": [{"name": o.name, "space": o.describe_space()} for o in optimizers],
    }

