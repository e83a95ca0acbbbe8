"""The :class:`Instrument` protocol and the per-step :class:`StepContext` instruments read.

An instrument has a ``name``, a schedule (``every`` / ``start``) and ``measure(ctx)``
returning ``{key: value}``. Two-phase instruments (update size, opposing signals) also
implement ``measure_after(ctx)``, called once the optimizer step has happened; set
``two_phase = True`` and keep what ``measure`` saw on the instrument itself. The context
computes the expensive shared pieces (gradient, outputs, per-example gradients and their
moments) once per step and caches them for every instrument of that step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from gradkit.autodiff import per_example_grads

from .basic import per_example_losses
from .gradients import GradientMoments, gradient_moments


class Instrument:
    """Base class: a named measurement on a schedule.

    An instrument runs at step ``t`` when ``t ≥ start`` and ``(t − start) % every == 0``, and
    at every step from ``start`` to ``dense_until`` (default 0: never); override :meth:`due`
    for any other schedule.

    Args:
        every: period in steps (a positive int).
        start: first step at which the instrument runs (a non-negative int).

    Example::

        >>> from gradkit.instruments import Instrument
        >>> class Step(Instrument):
        ...     name = "step_seen"
        ...     touches_model = False
        ...     def measure(self, ctx):
        ...         return {"step_seen": ctx.step}
        >>> ins = Step(every=3, start=1)
        >>> [t for t in range(8) if ins.due(t)], ins.next_due(5)
        ([1, 4, 7], 7)
    """

    name: str = "instrument"
    two_phase: bool = False
    #: False for instruments that only read tensors through the context: the Monitor then
    #: skips the sandbox (RNG/mode/buffer save-restore) unless the context needs the model
    touches_model: bool = True
    #: also run at every step before this one (from ``start``)
    dense_until: int = 0

    def __init__(self, every: int = 1, start: int = 0):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"Invalid every: {every} (a positive number of steps)")
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"Invalid start: {start}")
        self.every = every
        self.start = start

    def due(self, step: int) -> bool:
        """Whether the instrument runs at ``step``."""
        return step >= self.start and (step < self.dense_until
                                       or (step - self.start) % self.every == 0)

    def next_due(self, step: int) -> int | None:
        """The first step ``>= step`` at which :meth:`due` holds, or ``None`` when a
        subclass overrides :meth:`due` (its schedule is then unknown ahead of time)."""
        if type(self).due is not Instrument.due:
            return None
        start, every = self.start, self.every
        if step <= start:
            return start
        return step if step < self.dense_until else start - (start - step) // every * every

    def measure(self, ctx: StepContext) -> dict[str, Any]:
        """The quantities of this step, ``{key: value}`` (floats, ints, strings or lists)."""
        raise NotImplementedError

    def measure_after(self, ctx: StepContext) -> dict[str, Any]:
        """Two-phase instruments: the quantities once the optimizer step has happened."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(every={self.every}, start={self.start})"


def split_batch(batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(inputs, targets)`` or ``(inputs, targets, example_ids)``."""
    if (type(batch) not in (tuple, list) and not isinstance(batch, Sequence)) or \
            len(batch) not in (2, 3):
        raise ValueError("a batch is (inputs, targets) or (inputs, targets, example_ids)")
    return batch[0], batch[1], batch[2] if len(batch) == 3 else None


class StepContext:
    """What the instruments of one step see; shared computations are cached.

    The :class:`~gradkit.instruments.Monitor` builds one per step at which an instrument
    is due; it can also be built directly to run instruments without a Monitor. It holds
    no reference to the Monitor.

    Args:
        step: the step number.
        batch: ``(inputs, targets)`` or ``(inputs, targets, example_ids)``.
        model: the network.
        loss_fn: its mean-reduced ``loss_fn(outputs, targets)``.
        loss: the step's training loss as passed to ``Monitor.step`` (or ``None``).
        optimizer: the optimizer (or ``None``).
        named_params: ``(name, parameter)`` pairs; those with ``requires_grad`` are measured
            (default: ``model.named_parameters()``).
        max_examples: per-example gradients use at most this many batch examples.
        chunk_size: per-example gradients are vmapped in chunks of this size (``None``: one
            call).
        seed: seed of the private generator of random probes (see :meth:`generator`).
        outputs: the training forward's outputs on these very inputs, if known: reused
            instead of a fresh forward pass.
        sandbox: a zero-argument callable returning the context manager that isolates a
            measurement from the training state (the Monitor's saves and restores the RNG,
            module modes and buffers); entered at most once per :meth:`phase`, before the
            first computation that runs the model. Default: no isolation.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from gradkit.instruments import GradNorm, StepContext
        >>> model = nn.Linear(3, 2)
        >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
        >>> ctx = StepContext(0, (x, y), model, nn.functional.cross_entropy)
        >>> sorted(ctx.params()), ctx.per_example_moments().m
        (['bias', 'weight'], 4)
        >>> GradNorm().measure(ctx)["grad_norm"] > 0
        True
    """

    def __init__(self, step: int, batch: Any, model: nn.Module,
                 loss_fn: Callable[[Tensor, Tensor], Tensor], *, loss: Any = None,
                 optimizer: torch.optim.Optimizer | None = None,
                 named_params: Sequence[tuple[str, Tensor]] | None = None,
                 max_examples: int = 256, chunk_size: int | None = 64, seed: int = 0,
                 outputs: Tensor | None = None,
                 sandbox: Callable[[], AbstractContextManager[Any]] = nullcontext):
        self.step = step
        self.inputs, self.targets, self.index = split_batch(batch)
        self.model, self.loss_fn, self.loss, self.optimizer = model, loss_fn, loss, optimizer
        self.max_examples, self.chunk_size, self.seed = max_examples, chunk_size, seed
        self._named_params = (list(model.named_parameters()) if named_params is None
                              else named_params)
        self._outputs_given = outputs
        self._make_sandbox = sandbox
        self._cache: dict[str, Any] = {}
        self._in_phase = False
        self._sandbox: Any = None  # the entered guard of the current phase, if any

    def sandbox(self) -> None:
        """Enter the measurement sandbox (once per phase) before running the model."""
        if self._in_phase and self._sandbox is None:
            guard = self._make_sandbox()
            guard.__enter__()
            self._sandbox = guard

    def begin_phase(self) -> None:
        """Start a measurement phase: :meth:`sandbox` may enter the sandbox from now on."""
        self._in_phase = True

    def end_phase(self) -> None:
        """End the phase: leave the sandbox if it was entered."""
        self._in_phase = False
        guard, self._sandbox = self._sandbox, None
        if guard is not None:
            guard.__exit__(None, None, None)

    @contextmanager
    def phase(self) -> Iterator[None]:
        """A measurement phase (:meth:`begin_phase` ... :meth:`end_phase`)."""
        self.begin_phase()
        try:
            yield
        finally:
            self.end_phase()

    def _cached(self, key: str, fn: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def params(self) -> dict[str, Tensor]:
        """The trainable parameters (live tensors; never modified)."""
        return self._cached("params", lambda: {
            n: p for n, p in self._named_params if p.requires_grad})

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
        """Model outputs on the batch: the training forward's when given, else a
        ``no_grad`` forward."""
        return self._cached("outputs", self._outputs)

    def _outputs(self) -> Tensor:
        if self._outputs_given is not None:
            return self._outputs_given
        self.sandbox()
        with torch.no_grad():
            return self.model(self.inputs)

    def per_example_losses(self) -> Tensor:
        """Per-example losses of the batch, shape ``(B,)``."""
        return self._cached("pel", lambda: per_example_losses(
            self.model, self.loss_fn, self.inputs, self.targets, outputs=self.outputs()))

    def per_example_grads(self) -> dict[str, Tensor]:
        """Per-example gradients of (at most ``max_examples``) batch examples."""
        def compute():
            self.sandbox()
            m, chunk = self.max_examples, self.chunk_size
            x, y = self.inputs[:m], self.targets[:m]
            if chunk is not None and x.shape[0] <= chunk:
                chunk = None  # one vmap call (chunking has a cost of its own)
            return per_example_grads(self.model, self.loss_fn, x, y, chunk_size=chunk)
        return self._cached("peg", compute)

    def per_example_moments(self) -> GradientMoments:
        """:class:`GradientMoments` of :meth:`per_example_grads`, shared by coherence, noise
        scale, SNR and the batch-size tests."""
        return self._cached("peg_moments", lambda: gradient_moments(self.per_example_grads()))

    def generator(self) -> torch.Generator:
        """A private generator seeded from ``(seed, step)``: random probes never touch the
        global RNG and are reproducible."""
        device = next(iter(self.params().values())).device
        g = torch.Generator(device=device)
        g.manual_seed(self.seed * 1_000_003 + self.step)
        return g
