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
A Monitor that is never closed is closed at interpreter exit (records still buffered are
written; the Monitor is not kept alive for it).

The Monitor never changes the trajectory: the global CPU (and CUDA) RNG state is saved and
restored around measurements, never write ``p.grad`` (gradients are read, or computed
with ``torch.autograd.grad``), never touch parameters or optimizer state, restore every
module's ``training`` flag and all buffers (e.g. BatchNorm running statistics). By default
measurements run with the model in eval mode (``eval_mode=True``: no Dropout noise, BatchNorm
on running statistics, which per-example gradients and Hessian-vector products require).
"""

from __future__ import annotations

import atexit
import math
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .core import Instrument, StepContext, split_batch
from .library import default_instruments
from .records import RunWriter, new_run_id

#: recorded quantities whose first non-finite value means the run diverged
DIVERGENCE_KEYS = ("loss", "grad_norm", "update_size")

#: Monitors with open sinks, closed at interpreter exit (weak: never kept alive for it)
_OPEN: weakref.WeakSet[Monitor] = weakref.WeakSet()


@atexit.register
def _close_open_monitors() -> None:
    for monitor in list(_OPEN):
        try:
            monitor.close()
        except Exception as exc:  # at exit: report, and close the others
            warnings.warn(f"gradkit: closing a Monitor at exit failed ({exc})",
                          RuntimeWarning, stacklevel=1)


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
        """The step's record (``{"step": t, key: value, ...}``)."""
        return self._pending.record

    def __enter__(self) -> StepHandle:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._monitor._finish(self._pending, run_after=exc_type is None)


class Sandbox:
    """The measurement sandbox: global RNG, module modes and buffers are restored on exit.

    Args:
        model: the network.
        eval_mode: put the model in eval mode inside the sandbox.

    Calling it returns the context manager; :attr:`active` is ``True`` inside it.
    """

    def __init__(self, model: nn.Module, eval_mode: bool = True):
        self.model, self.eval_mode = model, eval_mode
        self.devices = sorted({p.device.index or 0 for p in model.parameters()
                               if p.device.type == "cuda"})
        self.active = False

    @contextmanager
    def __call__(self) -> Iterator[None]:
        modes = [(m, m.training) for m in self.model.modules()]
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]  # often none
        cpu_rng = torch.get_rng_state()
        cuda_rng = [torch.cuda.get_rng_state(d) for d in self.devices]
        self.active = True
        try:
            if self.eval_mode:
                self.model.eval()
            yield
        finally:
            self.active = False
            torch.set_rng_state(cpu_rng)
            for d, state in zip(self.devices, cuda_rng):
                torch.cuda.set_rng_state(state, d)
            for m, training in modes:
                if m.training is not training:  # (Module.__setattr__ is slow)
                    m.training = training
            with torch.no_grad():
                for b, saved in buffers:
                    if not torch.equal(b, saved):
                        b.copy_(saved)


class Monitor:
    """Training-dynamics instruments on per-instrument schedules, written to JSONL/SQLite.

    Args:
        model: the network.
        loss_fn: its mean-reduced ``loss_fn(outputs, targets)``.
        optimizer: read for thresholds, learning rate and Adam's preconditioner (optional).
        instruments: instrument objects (default :func:`default_instruments`).
        every: override the periods: an int for all instruments, or ``{name: every}``. An
            overridden instrument of the default set runs from step 0 (the default set
            starts the Hessian instruments at step 1000); an instrument you passed keeps its
            ``start``, with a warning when that is after step 0.
        log_dir: run directory for ``metrics.jsonl`` / ``metrics.sqlite`` (``None``: keep
            records in memory only, see :attr:`history`). Several runs may share one
            directory: each record carries the Monitor's :attr:`run_id`.
        jsonl: write ``metrics.jsonl``.
        sqlite: write ``metrics.sqlite``.
        tensorboard: mirror scalars to ``log_dir/tensorboard/<run_id>`` (needs
            ``pip install 'gradkit[tensorboard]'``; missing -> MissingExtraError).
        mlflow: mirror scalars to MLflow: ``True`` logs into the active MLflow run, else a
            new run in the configured tracking store; a string is a tracking URI (e.g.
            ``"file:///tmp/mlruns"``) in which a new run is created (needs
            ``pip install 'gradkit[mlflow]'``).
        mlflow_experiment: experiment of a new MLflow run (default ``"gradkit"``).
        eval_mode: measure with the model in eval mode (restored afterwards).
        max_examples: per-example gradients use at most this many batch examples.
        chunk_size: per-example gradients are vmapped in chunks of this size.
        seed: seed of the private generators used for random probes.
        capture_outputs: keep a reference to the training forward's output (a forward hook)
            so logit statistics reuse it instead of running their own forward pass (in the
            measurement mode). Off by default: the hook costs every step (~2% of a 0.6 ms
            step), more than the forward it saves at the default schedule.
        keep_history: also keep the records in :attr:`history`.
        flush_every: records between two writes to disk (one SQLite transaction each).
        clock: timer of the per-instrument costs in :attr:`timings` (e.g.
            ``time.process_time`` to measure CPU time on a shared machine).
        run_id: the run id written with every record (default: UTC start time and a random
            suffix).

    The Monitor never changes the trajectory (see the module notes). The model's
    parameters are listed once, at construction; parameters registered on the model
    afterwards are not measured (``requires_grad`` is read at every measurement).

    A loss, gradient norm or update size that becomes NaN or infinite is warned about once,
    at the step it happens (records go on; non-finite values are stored as null and the
    dashboard marks where they start). Disk errors never stop training: see
    :mod:`gradkit.instruments.records`.

    Example::

        >>> import tempfile, torch
        >>> from torch import nn
        >>> from gradkit.instruments import Monitor
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> loss_fn = nn.functional.cross_entropy
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> with tempfile.TemporaryDirectory() as run_dir:
        ...     with Monitor(model, loss_fn, optimizer, log_dir=run_dir,
        ...                  every={"sharpness": 5}) as monitor:
        ...         for _ in range(10):
        ...             optimizer.zero_grad()
        ...             loss = loss_fn(model(x), y)
        ...             loss.backward()
        ...             with monitor.step((x, y), loss=loss):
        ...                 optimizer.step()
        >>> monitor.series("sharpness")[0], len(monitor.series("loss")[0])
        ([0, 5], 10)
        >>> 0 < monitor.history[0]["sharpness"] < monitor.history[0]["sharpness_threshold"]
        True
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                 optimizer: torch.optim.Optimizer | None = None, *,
                 instruments: Iterable[Instrument] | None = None,
                 every: int | Mapping[str, int] | None = None,
                 log_dir: str | Path | None = None, jsonl: bool = True, sqlite: bool = True,
                 tensorboard: bool = False, mlflow: bool | str = False,
                 mlflow_experiment: str | None = None, eval_mode: bool = True,
                 max_examples: int = 256, chunk_size: int | None = 64, seed: int = 0,
                 capture_outputs: bool = False, keep_history: bool = True,
                 flush_every: int = 50, clock: Callable[[], float] = time.perf_counter,
                 run_id: str | None = None):
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.instruments = list(default_instruments(optimizer) if instruments is None
                                else instruments)
        names = [ins.name for ins in self.instruments]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"instrument names must be unique; repeated: {dupes}")
        self._apply_every(every, defaults=instruments is None)
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
        self.writer = None
        if log_dir is not None or mlflow:
            self.writer = RunWriter(log_dir, jsonl=jsonl and log_dir is not None,
                                    sqlite=sqlite and log_dir is not None,
                                    tensorboard=tensorboard, mlflow=mlflow,
                                    mlflow_experiment=mlflow_experiment,
                                    flush_every=flush_every, run_id=run_id,
                                    meta={"instruments": repr(self.instruments)})
            _OPEN.add(self)
        #: the id written with every record of this run
        self.run_id = self.writer.run_id if self.writer is not None else run_id or new_run_id()
        #: ``(step, key, value)`` of the first non-finite loss / gradient norm / update size
        self.first_nonfinite: tuple[int, str, float] | None = None
        self._named_params = list(model.named_parameters())
        self._next_step = 0
        self._pending: _Pending | None = None
        self._captured: tuple[Any, Tensor] | None = None
        self._sandbox = Sandbox(model, eval_mode)
        self._hook = model.register_forward_hook(self._capture) if capture_outputs else None
        self._closed = False

    def _apply_every(self, every: int | Mapping[str, int] | None, defaults: bool) -> None:
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
            ins = known[name]
            ins.every = n
            if defaults:  # the default's late start and dense head are cost choices
                ins.start, ins.dense_until = 0, 0
            elif ins.start > 0:
                warnings.warn(f"Monitor(every={{{name!r}: {n}}}): {name} first runs at step "
                              f"{ins.start}, its start; set {type(ins).__name__}(start=0) to "
                              "run it from step 0", UserWarning, stacklevel=3)

    def _capture(self, _module, args, output) -> None:
        if not self._sandbox.active and args and isinstance(output, Tensor):
            self._captured = (args[0], output.detach())

    def _context(self, step: int, batch: Any, loss: Any) -> StepContext:
        inputs = batch[0] if type(batch) in (tuple, list) else split_batch(batch)[0]
        captured = self._captured
        outputs = captured[1] if captured is not None and captured[0] is inputs else None
        return StepContext(step, batch, self.model, self.loss_fn, loss=loss,
                           optimizer=self.optimizer, named_params=self._named_params,
                           max_examples=self.max_examples, chunk_size=self.chunk_size,
                           seed=self.seed, outputs=outputs, sandbox=self._sandbox)

    def _measure(self, ctx: StepContext, instruments: list[Instrument], method: str,
                 record: dict[str, Any]) -> None:
        """Run ``method`` of each instrument; the sandbox is entered before the first one
        that touches the model (or when the context itself needs the model)."""
        ctx.begin_phase()  # (not the phase() context manager: this runs at every step)
        try:
            for ins in instruments:
                if ins.touches_model:
                    ctx.sandbox()
                t0 = self.clock()
                record.update(getattr(ins, method)(ctx))
                timing = self.timings[ins.name]
                timing[0] += self.clock() - t0
                timing[1] += method == "measure"
        finally:
            ctx.end_phase()

    def step(self, batch: Any, loss: Tensor | float | None = None, *,
             step: int | None = None) -> StepHandle:
        """Run the instruments due at this step.

        Call after ``loss.backward()`` and before ``optimizer.step()``, or use the returned
        handle as a context manager around ``optimizer.step()``.

        Args:
            batch: ``(inputs, targets)`` or ``(inputs, targets, example_ids)``.
            loss: the step's training loss (recorded as is by the ``loss`` instrument).
            step: the step number (default: one more than the previous call's, from 0).
        """
        if self._pending is not None:
            self._finish(self._pending, run_after=True)
        t = self._next_step if step is None else int(step)
        self._next_step = t + 1
        due = [ins for ins in self.instruments if ins.due(t)]  # (~0.1 us each)
        record: dict[str, Any] = {"step": t}
        ctx = None
        if due:
            ctx = self._context(t, batch, loss)
            self._measure(ctx, due, "measure", record)
        self._pending = _Pending(t, record, ctx, [i for i in due if i.two_phase])
        return StepHandle(self, self._pending)

    def _finish(self, pending: _Pending, run_after: bool) -> None:
        if pending is not self._pending:
            return  # already written
        self._pending = None
        if run_after and pending.two_phase and pending.ctx is not None:
            self._measure(pending.ctx, pending.two_phase, "measure_after", pending.record)
        if len(pending.record) > 1:
            if self.first_nonfinite is None:
                self._check_finite(pending.record)
            if self.keep_history:
                self.history.append(pending.record)
            if self.writer is not None:
                self.writer.write(pending.record)

    def _check_finite(self, record: dict[str, Any]) -> None:
        for key in DIVERGENCE_KEYS:
            value = record.get(key)
            if isinstance(value, float) and not math.isfinite(value):
                self.first_nonfinite = (record["step"], key, value)
                warnings.warn(f"gradkit Monitor: {key} is {value} at step {record['step']}: "
                              "the run has diverged (warned once; non-finite values are "
                              "recorded as null and the dashboard marks where they start)",
                              RuntimeWarning, stacklevel=4)
                return

    def flush(self) -> None:
        """Write the pending record (two-phase instruments of a plain call are dropped) and
        flush the sinks."""
        if self._pending is not None:
            self._finish(self._pending, run_after=False)
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush, close the files and remove the forward hook (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
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
