"""Adaptive batch-size controller: run an AdAdaGrad test on the current batch, grow the batch.

Progressive batching in an existing training loop::

    batching = AdaptiveBatchSize(model, loss_fn, initial_batch_size=32, max_batch_size=1024,
                                 test="norm", eta=0.1, optimizer=optimizer, lr_rule="auto")
    loader = DataLoader(train_set, batch_sampler=batching.make_sampler(train_set, seed=0))
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        batching.step(x, y)   # may grow the next batch (and rescale the lr)

The loader line replaces ``DataLoader(train_set, batch_size=32, shuffle=True)`` and
``batching.step`` is the one added line.

Choices (documented; see also :mod:`gradkit.batching.statistics`):

* ``step`` is meant to be called after ``optimizer.step()``: the per-example gradients are
  then taken at the updated parameters on the batch just used (one step stale, and no lr
  change can hit a step taken with the old batch size). :meth:`update` accepts per-example
  gradients or statistics you computed yourself, e.g. at the pre-step parameters.
* The test runs on steps 0, ``test_interval``, 2·``test_interval``, …; other calls are free.
  A batch of fewer than 2 examples (a tiny last batch of an epoch) is skipped.
* The variance comes from the examples actually in the batch (the last batch of an epoch can
  be smaller), while the floor "never decrease" is the controller's current batch size.
* With ``lr_rule``, each growth from ``B_old`` to ``B_new`` multiplies every param group's
  current lr by ``s(B_new)/s(B_old)`` (``s(B) = B`` or ``sqrt(B)``), so the lr stays
  ``lr0 · s(B/B0)`` relative to whatever else changes it; chainable schedulers
  (``ExponentialLR`` …) compose with this. Closed-form schedulers (``LambdaLR``,
  :class:`gradkit.schedules.LinearDecayLR`, :class:`gradkit.schedules.RefinedLR`) recompute
  the lr from ``base_lrs``: pass them as ``scheduler=`` and their ``base_lrs`` are scaled too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sized
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gradkit._checks import check_positive, check_positive_int
from gradkit.autodiff import per_example_grads
from gradkit.batching.lr_scaling import LRRule, default_lr_rule, lr_scale_factor
from gradkit.batching.sampler import AdaptiveBatchSampler
from gradkit.batching.statistics import (
    TESTS,
    BatchSizeDecision,
    GradientStatistics,
    PerExampleGrads,
    run_test,
)


class AdaptiveBatchSize:
    """Proposes and sets the next batch size from a batch-size test on the current batch.

    Args:
        model: the network (read only; per-example gradients via
            :func:`gradkit.autodiff.per_example_grads`).
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced, as used for training.
        initial_batch_size: B0 (default: the sampler's batch size, if a sampler is given).
        max_batch_size: cap on the batch size.
        test: ``"norm"`` (default), ``"inner_product"``, ``"orthogonality"``,
            ``"augmented"`` or ``"coordinate"``.
        eta, theta, nu: thresholds of the norm / coordinate, inner-product and orthogonality
            tests (AdAdaGrad's defaults 0.1).
        test_interval: run the test every this many calls of :meth:`step`.
        optimizer: needed with ``lr_rule``.
        lr_rule: ``None`` (leave the lr alone), ``"linear"``, ``"sqrt"`` or ``"auto"``
            (linear for SGD, square root for adaptive methods; see :mod:`.lr_scaling`).
        scheduler: a closed-form LRScheduler whose ``base_lrs`` follow the lr rescaling.
        sampler: an :class:`AdaptiveBatchSampler` to update (or create one with
            :meth:`make_sampler`).
        params: names of the parameters the test looks at (default: all trainable).
        chunk_size, method: passed to ``per_example_grads``.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], *,
                 initial_batch_size: int | None = None, max_batch_size: int,
                 test: str = "norm", eta: float = 0.1, theta: float = 0.1, nu: float = 0.1,
                 test_interval: int = 1, optimizer: torch.optim.Optimizer | None = None,
                 lr_rule: LRRule | Literal["auto"] | None = None,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                 sampler: AdaptiveBatchSampler | None = None,
                 params: Iterable[str] | None = None, chunk_size: int | None = 256,
                 method: Literal["auto", "vmap", "loop"] = "auto") -> None:
        if initial_batch_size is None:
            if sampler is None:
                raise ValueError("pass initial_batch_size (or a sampler to take it from)")
            initial_batch_size = sampler.batch_size
        check_positive_int("initial_batch_size", initial_batch_size)
        check_positive_int("max_batch_size", max_batch_size)
        check_positive_int("test_interval", test_interval)
        if max_batch_size < initial_batch_size:
            raise ValueError(f"Invalid max_batch_size value: {max_batch_size} (smaller than "
                             f"initial_batch_size={initial_batch_size})")
        if test not in TESTS:
            raise ValueError(f"Invalid test: {test!r} (use one of {', '.join(TESTS)})")
        for name, value in (("eta", eta), ("theta", theta), ("nu", nu)):
            check_positive(name, value)
        if lr_rule is not None:
            if optimizer is None:
                raise ValueError("lr_rule needs the optimizer whose lr to rescale")
            if lr_rule == "auto":
                lr_rule = default_lr_rule(optimizer)
            lr_scale_factor(1, 1, lr_rule)  # validates the rule name
        if sampler is not None and sampler.batch_size != initial_batch_size:
            raise ValueError(f"the sampler's batch size {sampler.batch_size} differs from "
                             f"initial_batch_size={initial_batch_size}")
        self.model, self.loss_fn = model, loss_fn
        self.initial_batch_size = initial_batch_size
        self.batch_size = initial_batch_size
        self.max_batch_size = max_batch_size
        self.test, self.eta, self.theta, self.nu = test, eta, theta, nu
        self.test_interval = test_interval
        self.optimizer, self.lr_rule, self.scheduler = optimizer, lr_rule, scheduler
        self.sampler = sampler
        self.params = None if params is None else list(params)
        self.chunk_size, self.method = chunk_size, method
        self.num_steps = 0
        self.history: list[tuple[int, BatchSizeDecision]] = []

    def make_sampler(self, data_source: Sized | int, *, shuffle: bool = True, seed: int = 0,
                     drop_last: bool = False) -> AdaptiveBatchSampler:
        """An :class:`AdaptiveBatchSampler` at the current batch size, updated by this
        controller (pass it as ``DataLoader(..., batch_sampler=...)``)."""
        self.sampler = AdaptiveBatchSampler(data_source, self.batch_size, shuffle=shuffle,
                                            seed=seed, drop_last=drop_last,
                                            max_batch_size=self.max_batch_size)
        return self.sampler

    @property
    def lr_scale(self) -> float:
        """Cumulative lr factor ``s(B/B0)`` applied so far (1 without ``lr_rule``)."""
        if self.lr_rule is None:
            return 1.0
        return lr_scale_factor(self.initial_batch_size, self.batch_size, self.lr_rule)

    def step(self, inputs: Tensor, targets: Tensor) -> BatchSizeDecision | None:
        """Count one training step; on test steps, test this batch and maybe grow.

        Returns the decision on test steps and ``None`` otherwise. A batch of fewer than 2
        examples (a tiny last batch of an epoch) has no variance: its test is skipped.
        """
        index = self.num_steps
        self.num_steps += 1
        if index % self.test_interval or inputs.shape[0] < 2:
            return None
        grads = per_example_grads(self.model, self.loss_fn, inputs, targets, params=self.params,
                                  chunk_size=self.chunk_size, method=self.method)
        return self._apply(index, grads)

    def update(self, grads: PerExampleGrads | GradientStatistics) -> BatchSizeDecision:
        """Run the test on given per-example gradients (or statistics) and apply it."""
        return self._apply(self.num_steps, grads)

    def _apply(self, index: int, grads) -> BatchSizeDecision:
        decision = run_test(self.test, grads, eta=self.eta, theta=self.theta, nu=self.nu,
                            batch_size=self.batch_size, max_batch_size=self.max_batch_size)
        self._grow(decision.next_batch_size)
        self.history.append((index, decision))
        return decision

    def _grow(self, new: int) -> None:
        old = self.batch_size
        if new <= old:
            return
        if self.sampler is not None:
            new = self.sampler.set_batch_size(new)
        self.batch_size = new
        if self.lr_rule is None:
            return
        factor = lr_scale_factor(old, new, self.lr_rule)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], Tensor):
                group["lr"].mul_(factor)
            else:
                group["lr"] = group["lr"] * factor
        if self.scheduler is not None:
            self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters (the optimizer's lr is restored by its own state_dict)."""
        self.batch_size = int(state["batch_size"])
        self.num_steps = int(state["num_steps"])
        if self.sampler is not None and self.sampler.batch_size < self.batch_size:
            self.sampler.set_batch_size(self.batch_size)
