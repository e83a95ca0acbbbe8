"""The :class:`Instrument` protocol and the per-step :class:`StepContext` instruments read.

An instrument has a ``name``, a schedule (``every`` / ``start``) and ``measure(ctx)``
returning ``{key: value}``. Two-phase instruments (update size, opposing signals) also
implement ``measure_after(ctx)``, called once the optimizer step has happened; set
``two_phase = True``. The context computes the expensive shared pieces (gradient, outputs,
per-example gradients) once per step and caches them for every instrument of that step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from gradkit.autodiff import per_example_grads

from .basic import per_example_losses
from .gradients import GradientMoments, gradient_moments

if TYPE_CHECKING:
    from .monitor import Monitor


#: bumped whenever an instrument's ``every`` or ``start`` changes (see Monitor.step)
SCHEDULE_VERSION = [0]


class _ScheduleField:
    """A schedule attribute (``every``/``start``) whose assignment bumps SCHEDULE_VERSION."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else getattr(obj, self.slot)

    def __set__(self, obj: Any, value: int) -> None:
        setattr(obj, self.slot, value)
        SCHEDULE_VERSION[0] += 1


class Instrument:
    """Base class: a named measurement on a schedule (runs when ``step ≥ start`` and
    ``(step − start) % every == 0``)."""

    name: str = "instrument"
    two_phase: bool = False
    #: False for instruments that only read tensors through the context: the Monitor then
    #: skips the sandbox (RNG/mode/buffer save-restore) unless the context needs the model
    touches_model: bool = True

    def __init__(self, every: int = 1, start: int = 0):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"Invalid every: {every} (a positive number of steps)")
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"Invalid start: {start}")
        self._every = every
        self._start = start

    # ``every`` / ``start`` bump ``SCHEDULE_VERSION`` when set: the Monitor caches the next
    # step at which a standard schedule is due and re-plans after any change
    every = _ScheduleField()
    start = _ScheduleField()

    def due(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.every == 0

    def next_due(self, step: int) -> int | None:
        """The first step ``>= step`` at which :meth:`due` holds, or ``None`` when this
        instrument overrides :meth:`due` or the schedule properties (the Monitor then asks
        :meth:`due` at every step)."""
        cls = type(self)
        if cls.due is not Instrument.due or cls.every is not Instrument.every or \
                cls.start is not Instrument.start:
            return None
        start, every = self._start, self._every
        return start if step <= start else start - (start - step) // every * every

    def measure(self, ctx: StepContext) -> dict[str, Any]:
        raise NotImplementedError

    def measure_after(self, ctx: StepContext) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(every={self.every}, start={self.start})"


def split_batch(batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(inputs, targets)`` or ``(inputs, targets, example_ids)``."""
    if not isinstance(batch, Sequence) or len(batch) not in (2, 3):
        raise ValueError("a batch is (inputs, targets) or (inputs, targets, example_ids)")
    return batch[0], batch[1], batch[2] if len(batch) == 3 else None


class StepContext:
    """What the instruments of one step see; shared computations are cached."""

    def __init__(self, monitor: Monitor, step: int, batch: Any, loss: Any):
        self.monitor = monitor
        self.step = step
        self.inputs, self.targets, self.index = split_batch(batch)
        self.loss = loss
        self._cache: dict[str, Any] = {}
        self._in_phase = False
        self._sandbox: Any = None  # the entered guard of the current phase, if any

    def sandbox(self) -> None:
        """Enter the Monitor's measurement sandbox (once per phase) before running the model."""
        if self._in_phase and self._sandbox is None:
            guard = self.monitor._guard()
            guard.__enter__()
            self._sandbox = guard

    @contextmanager
    def phase(self) -> Iterator[None]:
        """A measurement phase; the sandbox entered during it is left at its end."""
        self._in_phase = True
        try:
            yield
        finally:
            self._in_phase = False
            guard, self._sandbox = self._sandbox, None
            if guard is not None:
                guard.__exit__(None, None, None)

    @property
    def model(self) -> nn.Module:
        return self.monitor.model

    @property
    def loss_fn(self) -> Callable[[Tensor, Tensor], Tensor]:
        return self.monitor.loss_fn

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.monitor.optimizer

    def _cached(self, key: str, fn: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def params(self) -> dict[str, Tensor]:
        """The trainable parameters (live tensors; never modified)."""
        return self._cached("params", lambda: {
            n: p for n, p in self.monitor._named_params if p.requires_grad})

    def grads(self) -> dict[str, Tensor]:
        """The gradient at this step: the ``p.grad`` the optimizer is about to use when any
        is set (``None`` read as 0), else computed on the batch with ``autograd.grad``
        (``p.grad`` is never written)."""
        return self._cached("grads", self._grads)

    def _grads(self) -> dict[str, Tensor]:
        params = self.params()
        if any(p.grad is not None for p in params.values()):
            return {n: p.grad.detach() if p.grad is not None else torch.zeros_like(p)
                    for n, p in params.items()}
        self.sandbox()
        with torch.enable_grad():
            loss = self.loss_fn(self.model(self.inputs), self.targets)
            gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        return {n: g if g is not None else torch.zeros_like(p)
                for (n, p), g in zip(params.items(), gs)}

    def outputs(self) -> Tensor:
        """Model outputs on the batch: those of the training forward pass when the Monitor
        captured it for these very inputs, else a ``no_grad`` forward."""
        return self._cached("outputs", self._outputs)

    def _outputs(self) -> Tensor:
        captured = self.monitor._captured
        if captured is not None and captured[0] is self.inputs:
            return captured[1]
        self.sandbox()
        with torch.no_grad():
            return self.model(self.inputs)

    def per_example_losses(self) -> Tensor:
        return self._cached("pel", lambda: per_example_losses(
            self.model, self.loss_fn, self.inputs, self.targets, outputs=self.outputs()))

    def per_example_grads(self) -> dict[str, Tensor]:
        """Per-example gradients of (at most ``monitor.max_examples``) batch examples."""
        def compute():
            self.sandbox()
            m, chunk = self.monitor.max_examples, self.monitor.chunk_size
            x, y = self.inputs[:m], self.targets[:m]
            if chunk is not None and x.shape[0] <= chunk:
                chunk = None  # one vmap call (chunking has a cost of its own)
            return per_example_grads(self.model, self.loss_fn, x, y, chunk_size=chunk)
        return self._cached("peg", compute)

    def per_example_moments(self) -> GradientMoments:
        """Moments of :meth:`per_example_grads`, shared by coherence, noise scale and SNR."""
        return self._cached("peg_moments", lambda: gradient_moments(self.per_example_grads()))

    def generator(self) -> torch.Generator:
        """A private generator seeded from ``(monitor.seed, step)``: random probes never touch
        the global RNG and are reproducible."""
        device = next(iter(self.params().values())).device
        g = torch.Generator(device=device)
        g.manual_seed(self.monitor.seed * 1_000_003 + self.step)
        return g
