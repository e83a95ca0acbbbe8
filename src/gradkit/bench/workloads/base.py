"""The workload protocol: what a benchmark problem must declare and provide.

A *workload* is a fixed problem (model architecture, data, loss, evaluation metric) plus the
rules of the race: a validation target on the metric, a step budget, a batch size and how often
the (untimed) evaluation runs. The runner never looks inside a workload; it only uses:

.. code-block:: python

    class MyWorkload:                      # duck typing is enough; subclassing is optional
        name = "my-task"                   # short identifier (letters, digits, - _ .)
        metric = "accuracy"                # name of the evaluation metric
        higher_is_better = True            # direction of the metric
        target = 0.95                      # validation target on the metric
        steps = 500                        # step budget
        batch_size = 64
        eval_every = 25                    # evaluate on validation every k steps (untimed)

        def setup(self, seed: int) -> Problem: ...

    class Problem:                         # one seeded instance, built inside the worker
        model: torch.nn.Module             # its parameters are handed to the optimizer
        def train_loss(self, step: int) -> torch.Tensor: ...
            # scalar training loss (with graph) on the minibatch of ``step``; must return the
            # same batch when called twice with the same step (closure-based optimizers)
        def evaluate(self, split: str) -> tuple[float, float]: ...
            # (loss, metric) on "val" or "test", called under torch.no_grad()

``setup(seed)`` must be deterministic given the seed (model init and batch order). Data splits
are fixed per workload (independent of the trial seed), as in AlgoPerf, so seed-to-seed spread
measures the optimizer, not the split. A user workload plugs in as
``gradkit bench --workload package.module:factory`` where ``factory()`` returns such an object
(a class works: it is called with no arguments).

:class:`ArrayWorkload` implements ``setup`` for the common supervised case from three hooks:
``arrays()`` (train/val/test tensors), ``build_model()`` and ``loss_and_metric()``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from gradkit.errors import UsageError

SPLITS = ("val", "test")
_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*$")
REQUIRED_FIELDS = ("name", "metric", "higher_is_better", "target", "steps", "batch_size",
                   "eval_every")


@runtime_checkable
class Problem(Protocol):
    """One seeded instance of a workload."""

    model: nn.Module

    def train_loss(self, step: int) -> Tensor: ...

    def evaluate(self, split: str) -> tuple[float, float]: ...


@runtime_checkable
class Workload(Protocol):
    """A benchmark problem with its declared target and budget (see module docstring)."""

    name: str
    metric: str
    higher_is_better: bool
    target: float
    steps: int
    batch_size: int
    eval_every: int

    def setup(self, seed: int) -> Problem: ...


def describe(workload: Workload) -> dict[str, Any]:
    """The declared fields of a workload as a JSON-able dict (stored with every run)."""
    info = {field: getattr(workload, field) for field in REQUIRED_FIELDS}
    info["description"] = getattr(workload, "description", "") or ""
    return info


def validate(workload: Any, origin: str) -> Workload:
    """Check the protocol fields of ``workload``; raise a one-line :class:`UsageError`."""
    missing = [f for f in (*REQUIRED_FIELDS, "setup") if not hasattr(workload, f)]
    if missing:
        raise UsageError(
            f"workload {origin!r} does not follow the workload protocol: missing "
            f"{', '.join(missing)} (see gradkit.bench.workloads.base)"
        )
    if not callable(workload.setup):
        raise UsageError(f"workload {origin!r}: setup must be a method setup(seed) -> Problem")
    if not isinstance(workload.name, str) or not _NAME.match(workload.name):
        raise UsageError(f"workload {origin!r}: name must be a short identifier, got "
                         f"{workload.name!r}")
    for field in ("steps", "batch_size", "eval_every"):
        value = getattr(workload, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"workload {origin!r}: {field} must be a positive int, got {value!r}")
    target = workload.target
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(
        target
    ):
        raise UsageError(f"workload {origin!r}: target must be a finite number, got {target!r}")
    if not isinstance(workload.higher_is_better, bool):
        raise UsageError(f"workload {origin!r}: higher_is_better must be True or False")
    return workload


def reached(value: float, target: float, higher_is_better: bool) -> bool:
    """Whether a metric value meets the target (NaN never does)."""
    if not math.isfinite(value):
        return False
    return value >= target if higher_is_better else value <= target


# ------------------------------------------------------------------ supervised array workloads
@dataclass
class Arrays:
    """Train / validation / test tensors of a supervised workload."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


class EpochSampler:
    """Minibatch indices for step ``k``: a fresh permutation per epoch, drop-last.

    A pure function of ``(seed, step)`` (the current epoch's permutation is cached), so a
    closure that recomputes the loss of step ``k`` sees the same batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self.per_epoch = max(1, n // self.batch_size)
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> Tensor:
        epoch, slot = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[slot * self.batch_size : (slot + 1) * self.batch_size]


class ArrayProblem:
    """A :class:`Problem` over in-memory tensors with a loss-and-metric function."""

    def __init__(
        self,
        model: nn.Module,
        arrays: Arrays,
        loss_and_metric: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
        batch_size: int,
        seed: int,
    ):
        self.model, self.arrays, self.loss_and_metric = model, arrays, loss_and_metric
        self.sampler = EpochSampler(len(arrays.x_train), batch_size, seed)

    def train_loss(self, step: int) -> Tensor:
        idx = self.sampler.indices(step)
        out = self.model(self.arrays.x_train[idx])
        return self.loss_and_metric(out, self.arrays.y_train[idx])[0]

    def evaluate(self, split: str) -> tuple[float, float]:
        x, y = {"val": (self.arrays.x_val, self.arrays.y_val),
                "test": (self.arrays.x_test, self.arrays.y_test)}[split]
        loss, metric = self.loss_and_metric(self.model(x), y)
        return float(loss), float(metric)

    def probe(self) -> Any:
        """The ``--diagnose`` hook: the first ``batch_size`` (at most 256) training examples
        and the mean training loss (see :mod:`gradkit.bench.diagnostics`)."""
        from gradkit.bench.diagnostics import Probe

        n = min(self.sampler.batch_size, 256)
        return Probe(self.arrays.x_train[:n], self.arrays.y_train[:n],
                     lambda out, y: self.loss_and_metric(out, y)[0])

    def to(self, device: torch.device) -> ArrayProblem:
        """Move the model and the data to ``device`` (``gradkit bench --device``)."""
        self.model.to(device)
        self.arrays = Arrays(*(t.to(device) for t in vars(self.arrays).values()))
        return self


class ArrayWorkload:
    """Base class for supervised workloads on in-memory arrays.

    Subclasses set the protocol fields and implement :meth:`arrays` (called once per process;
    cached), :meth:`build_model` (called after ``torch.manual_seed(seed)``) and
    :meth:`loss_and_metric` (mean loss and metric of a batch of model outputs).
    """

    name = "array-workload"
    metric = "accuracy"
    higher_is_better = True
    target = 1.0
    steps = 100
    batch_size = 32
    eval_every = 10
    description = ""

    _cache: Arrays | None = None

    def arrays(self) -> Arrays:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def loss_and_metric(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def setup(self, seed: int) -> ArrayProblem:
        if self._cache is None:
            self._cache = self.arrays()
        torch.manual_seed(seed)
        model = self.build_model()
        return ArrayProblem(model, self._cache, self.loss_and_metric, self.batch_size, seed)


def cross_entropy_and_accuracy(output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy and accuracy of class logits."""
    loss = nn.functional.cross_entropy(output, target)
    accuracy = (output.argmax(dim=-1) == target).float().mean()
    return loss, accuracy


def split_indices(n: int, fractions: tuple[float, float], seed: int) -> tuple[Tensor, ...]:
    """Fixed shuffled split of ``range(n)`` into train / val / test (val, test fractions)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = round(n * fractions[0]), round(n * fractions[1])
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


def standardize(train: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """Scale features with the training split's mean and standard deviation."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-8)
    return tuple((t - mean) / std for t in (train, *others))
