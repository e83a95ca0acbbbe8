"""The :class:`Monitor`: runs instruments on their schedules inside an ordinary loop.

Usage (one call per step, after ``backward`` and around / before ``optimizer.step``)::

    monitor = Monitor(model, loss_fn, optimizer, log_dir="runs/exp1")
    for x, y in loader:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        with monitor.step((x, y), loss=loss):   # or: monitor.step((x, y), loss=loss)
            optimizer.step()
    monitor.close()

In the plain-call form the two-phase instruments (update size, opposing signals) complete
at the next ``monitor.step`` call, i.e. they measure the change between consecutive calls.

The Monitor never changes the trajectory: the global CPU (and CUDA) RNG state is saved and
restored around measurements, never write ``p.grad`` (gradients are read, or computed
with ``torch.autograd.grad``), never touch parameters or optimizer state, restore every
module's ``training`` flag and all buffers (e.g. BatchNorm running statistics). By default
measurements run with the model in eval mode (``eval_mode=True``: no Dropout noise, BatchNorm
on running statistics, which per-example gradients and Hessian-vector products require).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .core import SCHEDULE_VERSION, Instrument, StepContext
from .library import default_instruments
from .records import RunWriter


class _Pending:
    def __init__(self, step: int, record: dict[str, Any], ctx: StepContext | None,
                 two_phase: list[Instrument]):
        self.step, self.record, self.ctx, self.two_phase = step, record, ctx, two_phase


class StepHandle:
    """Returned by :meth:`Monitor.step`; as a context manager it wraps ``optimizer.step()``
    so two-phase instruments see the update, and writes the step's record on exit."""

    __slots__ = ("_monitor", "_pending")

    def __init__(self, monitor: Monitor, pending: _Pending):
        self._monitor, self._pending = monitor, pending

    @property
    def record(self) -> dict[str, Any]:
        return self._pending.record

    def __enter__(self) -> StepHandle:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._monitor._finish(self._pending, run_after=exc_type is None)


class _IdleHandle(StepHandle):
    """The handle of a step at which no instrument is due (nothing to do on exit)."""

    __slots__ = ("_step",)

    def __init__(self, step: int):  # no super().__init__: there is no pending record
        self._step = step

    @property
    def record(self) -> dict[str, Any]:
        return {"step": self._step}

    def __exit__(self, exc_type, exc, tb) -> None:
        return None


class Monitor:
    """Training-dynamics instruments on per-instrument schedules, written to JSONL/SQLite.

    Args:
        model, loss_fn: the network and its mean-reduced ``loss_fn(outputs, targets)``.
        optimizer: read for thresholds, learning rate and Adam's preconditioner (optional).
        instruments: instrument objects (default :func:`default_instruments`).
        every: override the periods (starts are kept): an int for all instruments, or
            ``{name: every}``.
        log_dir: run directory for ``metrics.jsonl`` / ``metrics.sqlite`` (``None``: keep
            records in memory only, see :attr:`history`).
        jsonl, sqlite, tensorboard: which sinks to write (TensorBoard needs
            ``pip install 'gradkit[tensorboard]'``; missing -> MissingExtraError).
        eval_mode: measure with the model in eval mode (restored afterwards).
        max_examples, chunk_size: per-example gradients use at most ``max_examples`` batch
            examples, vmapped in chunks of ``chunk_size``.
        seed: seed of the private generators used for random probes.
        capture_outputs: keep a reference to the training forward's output (a forward hook)
            so logit statistics reuse it instead of running their own forward pass (in the
            measurement mode). Off by default: the hook costs every step (~2% of a 0.6 ms
            step), more than the forward it saves at the default schedule.
        keep_history: also keep the records in :attr:`history`.
        flush_every: records between two writes to disk (one SQLite transaction each).
        clock: timer of the per-instrument costs in :attr:`timings` (e.g.
            ``time.process_time`` to measure CPU time on a shared machine).

    The model's parameters are listed once, at construction (``named_parameters`` walks the
    module tree, ~20 us a call); parameters registered on the model afterwards are not
    measured (``requires_grad`` is read at every measurement). Steps at which no instrument
    is due cost about a microsecond: the next due step of the standard schedules is cached
    and re-planned whenever an instrument's ``every`` or ``start`` changes.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                 optimizer: torch.optim.Optimizer | None = None, *,
                 instruments: Iterable[Instrument] | None = None,
                 every: int | Mapping[str, int] | None = None,
                 log_dir: str | Path | None = None, jsonl: bool = True, sqlite: bool = True,
                 tensorboard: bool = False, eval_mode: bool = True, max_examples: int = 256,
                 chunk_size: int | None = 64, seed: int = 0, capture_outputs: bool = False,
                 keep_history: bool = True, flush_every: int = 50,
                 clock: Callable[[], float] = time.perf_counter):
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.instruments = list(default_instruments(optimizer) if instruments is None
                                else instruments)
        names = [ins.name for ins in self.instruments]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"instrument names must be unique; repeated: {dupes}")
        self._apply_every(every)
        if max_examples < 2:
            raise ValueError(f"Invalid max_examples: {max_examples}")
        self.eval_mode, self.max_examples, self.chunk_size = eval_mode, max_examples, chunk_size
        self.seed, self.clock = seed, clock
        self.keep_history = keep_history
        self.history: list[dict[str, Any]] = []
        #: name -> [total seconds, calls] spent in each instrument
        self.timings: dict[str, list[float]] = {n: [0.0, 0] for n in names}
        if tensorboard and log_dir is None:
            raise ValueError("tensorboard=True needs a log_dir")
        self.writer = (RunWriter(log_dir, jsonl=jsonl, sqlite=sqlite, tensorboard=tensorboard,
                                 flush_every=flush_every,
                                 meta={"instruments": repr(self.instruments)})
                       if log_dir is not None else None)
        self._named_params = list(model.named_parameters())
        self._next_step = 0
        # [idle_from, idle_until): steps at which no standard-schedule instrument is due,
        # valid while the schedule version is unchanged; custom schedules are asked each step
        self._idle_from, self._idle_until, self._idle_version = 0, 0, -1
        self._custom = [ins for ins in self.instruments if ins.next_due(0) is None]
        self._pending: _Pending | None = None
        self._captured: tuple[Any, Tensor] | None = None
        self._measuring = False
        self._hook = model.register_forward_hook(self._capture) if capture_outputs else None
        self._devices = sorted({p.device.index or 0 for p in model.parameters()
                                if p.device.type == "cuda"})

    def _apply_every(self, every: int | Mapping[str, int] | None) -> None:
        if every is None:
            return
        if isinstance(every, int):
            every = {ins.name: every for ins in self.instruments}
        known = {ins.name: ins for ins in self.instruments}
        unknown = sorted(set(every) - set(known))
        if unknown:
            raise ValueError(f"every names unknown instrument(s) {unknown}; known: "
                             f"{sorted(known)}")
        for name, n in every.items():
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"Invalid every for {name!r}: {n}")
            known[name].every = n

    def _capture(self, _module, args, output) -> None:
        if not self._measuring and args and isinstance(output, Tensor):
            self._captured = (args[0], output.detach())

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Measurement sandbox: global RNG, module modes and buffers are restored."""
        modes = [(m, m.training) for m in self.model.modules()]
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]  # often none
        cpu_rng = torch.get_rng_state()
        cuda_rng = [torch.cuda.get_rng_state(d) for d in self._devices]
        self._measuring = True
        try:
            if self.eval_mode:
                self.model.eval()
            yield
        finally:
            self._measuring = False
            torch.set_rng_state(cpu_rng)
            for d, state in zip(self._devices, cuda_rng):
                torch.cuda.set_rng_state(state, d)
            for m, training in modes:
                if m.training is not training:  # (Module.__setattr__ is slow)
                    m.training = training
            with torch.no_grad():
                for b, saved in buffers:
                    if not torch.equal(b, saved):
                        b.copy_(saved)

    def _measure(self, ctx: StepContext, instruments: list[Instrument], method: str,
                 record: dict[str, Any]) -> None:
        """Run ``method`` of each instrument; the sandbox is entered before the first one
        that touches the model (or when the context itself needs the model)."""
        with ctx.phase():
            for ins in instruments:
                if ins.touches_model:
                    ctx.sandbox()
                t0 = self.clock()
                record.update(getattr(ins, method)(ctx))
                timing = self.timings[ins.name]
                timing[0] += self.clock() - t0
                timing[1] += method == "measure"

    def step(self, batch: Any, loss: Tensor | float | None = None, *,
             step: int | None = None) -> StepHandle:
        """Run the instruments due at this step on ``batch`` = ``(inputs, targets)`` or
        ``(inputs, targets, example_ids)``; ``loss`` is the step's training loss (recorded
        as is). Call after ``loss.backward()`` and before ``optimizer.step()``, or use the
        returned handle as a context manager around ``optimizer.step()``."""
        if self._pending is not None:
            self._finish(self._pending, run_after=True)
        t = self._next_step if step is None else int(step)
        self._next_step = t + 1
        if (self._idle_from <= t < self._idle_until
                and self._idle_version == SCHEDULE_VERSION[0]
                and (not self._custom or not any(ins.due(t) for ins in self._custom))):
            return _IdleHandle(t)
        due = self._plan(t)
        record: dict[str, Any] = {"step": t}
        ctx = None
        if due:
            ctx = StepContext(self, t, batch, loss)
            self._measure(ctx, due, "measure", record)
        self._pending = _Pending(t, record, ctx, [i for i in due if i.two_phase])
        return StepHandle(self, self._pending)

    def _plan(self, t: int) -> list[Instrument]:
        """The instruments due at step ``t``; caches the following steps at which no
        standard-schedule instrument is due."""
        due, until = [], t + 2**62
        for ins in self.instruments:
            n = ins.next_due(t)
            if n is None:  # a custom schedule
                if ins.due(t):
                    due.append(ins)
                continue
            if n == t:
                due.append(ins)
                n = ins.next_due(t + 1)
            until = min(until, n)
        self._idle_from, self._idle_until = t + 1, until
        self._idle_version = SCHEDULE_VERSION[0]
        return due

    def _finish(self, pending: _Pending, run_after: bool) -> None:
        if pending is not self._pending:
            return  # already written
        self._pending = None
        if run_after and pending.two_phase and pending.ctx is not None:
            self._measure(pending.ctx, pending.two_phase, "measure_after", pending.record)
        if len(pending.record) > 1:
            if self.keep_history:
                self.history.append(pending.record)
            if self.writer is not None:
                self.writer.write(pending.record)

    def flush(self) -> None:
        """Write the pending record (two-phase instruments of a plain call are dropped) and
        flush the sinks."""
        if self._pending is not None:
            self._finish(self._pending, run_after=False)
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush, close the files and remove the forward hook."""
        self.flush()
        if self.writer is not None:
            self.writer.close()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def series(self, name: str) -> tuple[list[int], list[Any]]:
        """``(steps, values)`` of one recorded quantity from :attr:`history`."""
        pts = [(r["step"], r[name]) for r in self.history if name in r]
        return [s for s, _ in pts], [v for _, v in pts]
