"""Typed records of the benchmark: what a trial produced, and how it is read back.

* :class:`CurvePoint` -- one evaluation point of a trial (a named tuple, so plots read
  ``point.val_metric`` rather than a column position).
* :class:`Diagnostic` -- one instrument reading at an evaluation point (``gradkit bench
  --diagnose``).
* :class:`TrialOutcome` -- what :func:`gradkit.bench.runner.run_trial` returns. Its scalar
  fields are, in order, the outcome columns of the store's ``trials`` table
  (:data:`OUTCOME_COLUMNS`); ``curve`` and ``diagnostics`` go to their own tables.
* :class:`TrialRecord` -- a stored trial as :meth:`gradkit.bench.store.Store.trials` returns
  it: the trial's identity (:data:`IDENTITY_COLUMNS`) and its outcome fields. Its ``curve`` and
  ``diagnostics`` are empty; read them with ``Store.curves`` / ``Store.diagnostics``.

This module imports neither torch nor numpy (``gradkit report`` reads records without torch).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, NamedTuple

#: Trial statuses. ``ok``: the step budget was used up (the target may or may not have been
#: reached). ``diverged``: NaN guard (non-finite or exploding training loss, or a non-finite
#: evaluation); ``divergence`` says why. ``failed``: the optimizer or workload raised, or the
#: trial ran past ``--trial-timeout``; ``error`` says what. ``crashed``: the worker process
#: died (segfault, ``os._exit``, out of memory); ``error`` has the exit code or signal.
STATUSES = ("ok", "diverged", "failed", "crashed")


class CurvePoint(NamedTuple):
    """One evaluation of a trial (validation every ``eval_every`` steps and at the end)."""

    step: int
    seconds: float  # timed training seconds up to this step (evaluation is untimed)
    train_loss: float | None  # mean training loss since the previous point; None at step 0
    val_loss: float
    val_metric: float


class Diagnostic(NamedTuple):
    """One instrument reading (``name`` as in :mod:`gradkit.instruments`) at ``step``."""

    step: int
    name: str
    value: float | None  # None: the instrument gave no finite number at this point


@dataclass(frozen=True)
class TrialOutcome:
    """The result of one trial (one optimizer configuration, one seed, one workload)."""

    status: str
    steps_to_target: int | None = None  # first evaluation step reaching the val target
    seconds_to_target: float | None = None  # timed seconds at that step
    final_train_loss: float | None = None
    final_val_loss: float | None = None
    final_val_metric: float | None = None
    final_test_loss: float | None = None
    final_test_metric: float | None = None
    train_seconds: float = 0.0  # timed seconds of all steps done
    steps_done: int = 0
    divergence: str | None = None  # why a ``diverged`` trial was stopped
    error: str | None = None  # what went wrong in a ``failed`` / ``crashed`` trial
    curve: tuple[CurvePoint, ...] = ()
    diagnostics: tuple[Diagnostic, ...] = ()

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"Invalid trial status: {self.status!r}")

    def columns(self) -> tuple[Any, ...]:
        """The values of :data:`OUTCOME_COLUMNS`, in order."""
        return tuple(getattr(self, name) for name in OUTCOME_COLUMNS)


#: Outcome columns of the ``trials`` table: every scalar field of :class:`TrialOutcome`.
OUTCOME_COLUMNS: tuple[str, ...] = tuple(
    f.name for f in fields(TrialOutcome) if f.name not in ("curve", "diagnostics"))


@dataclass(frozen=True, kw_only=True)
class TrialRecord(TrialOutcome):
    """A stored trial: identity (which study, configuration and seed) plus its outcome."""

    key: str
    suite: str
    version: str
    workload: str
    optimizer: str
    hparams: dict[str, Any]
    seed: int
    phase: str  # "tune" or "seed"
    trial_index: int  # 0 = the defaults trial, 1..n = quasi-random configurations
    finished_at: str = ""

    @classmethod
    def from_outcome(cls, outcome: TrialOutcome, **identity: Any) -> TrialRecord:
        """The record of ``outcome`` (without curve and diagnostics) with ``identity``."""
        return cls(**{name: getattr(outcome, name) for name in OUTCOME_COLUMNS}, **identity)


#: Identity columns of the ``trials`` table (before the outcome columns).
IDENTITY_COLUMNS: tuple[str, ...] = (
    "key", "suite", "version", "workload", "optimizer", "hparams", "seed", "phase",
    "trial_index")
