"""``gradkit bench --diagnose``: instruments of :mod:`gradkit.instruments` run inside trials.

At every evaluation point (step 0, every ``eval_every`` steps and the last step), outside the
timed region and after the validation metric is taken, each requested instrument reads the
model on the workload's *probe batch* and the reading is stored in the ``diagnostics`` table
(:class:`~gradkit.bench.records.Diagnostic`). Nothing here touches the optimizer, ``p.grad``
or the global random state, so a trial's scores are the same with or without ``--diagnose``.

The hook on the workload is one optional method of its ``Problem``:

.. code-block:: python

    def probe(self) -> Probe:   # a fixed batch and the (mean) training loss function
        return Probe(inputs, targets, loss_fn)   # loss_fn(model(inputs), targets) -> scalar

:class:`~gradkit.bench.workloads.ArrayProblem` provides it (its first ``batch_size`` training
examples, at most 256). A workload without it gets no diagnostics (a note says so).

Instruments (names as in :mod:`gradkit.instruments`):

* ``grad_norm`` -- global norm of the probe-batch gradient (:func:`global_norm`).
* ``sharpness`` -- top Hessian eigenvalue of the probe-batch loss (:func:`sharpness`, Lanczos
  with a fixed-seed generator); compare with the stability threshold ``2/lr`` of GD.
* ``update_ratio`` -- ``‖θ_t − θ_{t−1}‖ / ‖θ_{t−1}‖`` of the step that ends at the evaluation
  point (:func:`update_ratio`); none at step 0.
* ``noise_scale`` -- simple gradient noise scale ``B_simple = tr Σ / |G|²`` from per-example
  gradients of the probe batch (:func:`noise_scale_per_example`).

A reading that raises or is not finite is stored as ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradkit.bench.records import Diagnostic
from gradkit.errors import UsageError

NAMES = ("grad_norm", "sharpness", "update_ratio", "noise_scale")


class Probe(NamedTuple):
    """A fixed batch of a workload and its mean training loss ``loss_fn(outputs, targets)``."""

    inputs: Tensor
    targets: Tensor
    loss_fn: Callable[[Tensor, Tensor], Tensor]


def parse_names(text: str) -> tuple[str, ...]:
    """``"grad_norm,sharpness"`` -> ``("grad_norm", "sharpness")`` (UsageError if unknown)."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in NAMES]
    if unknown or not names:
        raise UsageError(f"--diagnose: unknown instrument {', '.join(unknown) or repr(text)}; "
                         f"valid: {', '.join(NAMES)}")
    return names


class Diagnoser:
    """Runs the requested instruments on one trial's problem (inside the worker)."""

    def __init__(self, names: tuple[str, ...], problem: Any, readings: list[Diagnostic]):
        probe = getattr(problem, "probe", None)
        self.names = names if callable(probe) else ()
        self.problem = problem
        self.probe: Probe | None = probe() if self.names else None
        self._before: list[Tensor] | None = None
        self.readings = readings  # appended to by measure()

    def _params(self) -> list[Tensor]:
        return [p for p in self.problem.model.parameters() if p.requires_grad]

    def before_step(self, evaluates: bool) -> None:
        """Call before a step (untimed); keeps θ when the step ends at an evaluation point."""
        if evaluates and "update_ratio" in self.names:
            self._before = [p.detach().clone() for p in self._params()]

    def measure(self, step: int) -> None:
        """Read every instrument at ``step`` (untimed; the model is in eval mode meanwhile)."""
        if not self.names:
            return
        model = self.problem.model
        model.eval()
        try:
            for name in self.names:
                value = None
                try:
                    value = getattr(self, f"_{name}")()
                except Exception:  # an instrument that cannot read this model: no value
                    value = None
                if value is not None and not math.isfinite(value):
                    value = None
                if name != "update_ratio" or step > 0:
                    self.readings.append(Diagnostic(step, name, value))
        finally:
            model.train()
            self._before = None

    def _grad_norm(self) -> float:
        from gradkit.instruments import global_norm

        p = self.probe
        with torch.enable_grad():
            loss = p.loss_fn(self.problem.model(p.inputs), p.targets)
            grads = torch.autograd.grad(loss, self._params(), allow_unused=True)
        return global_norm([g for g in grads if g is not None])

    def _sharpness(self) -> float:
        from gradkit.instruments import sharpness

        p = self.probe
        with torch.enable_grad():
            values = sharpness(self.problem.model, p.loss_fn, (p.inputs, p.targets),
                               generator=torch.Generator().manual_seed(0))
        return float(values[0])

    def _update_ratio(self) -> float | None:
        from gradkit.instruments import update_ratio

        if self._before is None:
            return None
        return update_ratio(self._before, [p.detach() for p in self._params()])

    def _noise_scale(self) -> float:
        from gradkit.autodiff import per_example_grads
        from gradkit.instruments import noise_scale_per_example

        p = self.probe
        with torch.enable_grad():
            grads = per_example_grads(self.problem.model, p.loss_fn, p.inputs, p.targets)
        return noise_scale_per_example(grads).b_simple
