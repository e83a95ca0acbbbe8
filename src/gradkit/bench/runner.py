"""Run one trial: train a workload with one optimizer configuration and one seed.

The training loop is the same for every optimizer: ``optimizer.step(closure)`` where the
closure zeroes the gradients, computes the minibatch loss of the current step and
back-propagates (closure-based optimizers such as SAM work unchanged). Only the steps are
timed; evaluation (validation every ``eval_every`` steps and at the end, test at the end)
is untimed and runs under ``torch.no_grad()``.

Outcomes: ``ok`` (the budget was used up; the target may or may not have been reached),
``diverged`` (a non-finite or exploding training loss or a non-finite evaluation: NaN guard),
``failed`` (the optimizer or workload raised; the message is kept). Missing the target and
diverging both give infinite time to target; nothing here raises for those.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from gradkit.bench.diagnostics import Diagnoser
from gradkit.bench.optimizers import OptimizerSpec, resolve_optimizer
from gradkit.bench.records import CurvePoint, Diagnostic, TrialOutcome
from gradkit.bench.workloads import Workload, reached, resolve_workload

#: A training loss above ``EXPLODE_FACTOR * (|initial loss| + 1)`` counts as divergence.
EXPLODE_FACTOR = 1e6


@dataclass(frozen=True)
class TrialTask:
    """A picklable description of one trial (resolved again inside the worker)."""

    key: str
    suite: str
    workload: str
    workload_overrides: str
    optimizer: str
    hparams: str
    seed: int
    phase: str
    index: int
    device: str = "cpu"
    diagnose: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def trial_key(suite: str, version: str, workload: dict[str, Any], optimizer: str,
              hparams: dict[str, Any], seed: int) -> str:
    """Stable key: hash of suite and version, workload (spec and declared fields), optimizer,
    hyperparameters and seed."""
    payload = canonical_json([suite, version, workload, optimizer, hparams, seed])
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


_WARM = False


def warm_up() -> None:
    """Pay torch's one-time lazy imports (``torch._dynamo`` on the first optimizer step, about
    a second) before any trial is timed, once per process."""
    global _WARM
    if not _WARM:
        p = torch.nn.Parameter(torch.zeros(2))
        p.grad = torch.ones(2)
        torch.optim.SGD([p], lr=0.1).step()
        _WARM = True


def run_task(task: TrialTask) -> TrialOutcome:
    """Worker entry point: resolve the task's workload and optimizer, then run the trial."""
    torch.set_num_threads(1)
    warm_up()
    try:
        workload = resolve_workload(task.workload, json.loads(task.workload_overrides))
        spec = resolve_optimizer(task.optimizer)
    except Exception as exc:  # e.g. a user module that imports in the parent but not here
        return TrialOutcome("failed", error=f"{type(exc).__name__}: {exc}"[:500])
    return run_trial(workload, spec, json.loads(task.hparams), task.seed, device=task.device,
                     diagnose=task.diagnose)


def _evaluate(problem: Any, split: str) -> tuple[float, float]:
    problem.model.eval()
    try:
        with torch.no_grad():
            loss, metric = problem.evaluate(split)
    finally:
        problem.model.train()
    return float(loss), float(metric)


def _to_device(problem: Any, device: str, name: str) -> None:
    move = getattr(problem, "to", None)
    if not callable(move):
        raise RuntimeError(f"workload {name!r} cannot run on {device}: its Problem has no "
                           "to(device) method")
    move(torch.device(device))


def run_trial(workload: Workload, spec: OptimizerSpec, hparams: dict[str, Any],
              seed: int, *, device: str = "cpu", diagnose: tuple[str, ...] = ()
              ) -> TrialOutcome:
    """Train ``workload`` with ``spec`` at ``hparams`` and ``seed``; return its outcome.

    ``steps_to_target`` / ``seconds_to_target`` are ``None`` when the target was not reached;
    ``curve`` has a :class:`CurvePoint` at step 0, every ``eval_every`` steps and the end.
    ``device`` other than ``"cpu"`` moves the problem there (``Problem.to(device)``);
    ``diagnose`` names instruments read at evaluation points, untimed (see
    :mod:`gradkit.bench.diagnostics`).
    """
    curve: list[CurvePoint] = []
    seconds, step, window = 0.0, 0, []
    hit: tuple[int, float] | None = None
    diagnoser: Diagnoser | None = None
    readings: list[Diagnostic] = []
    cuda = device.startswith("cuda")
    try:
        torch.manual_seed(seed)
        problem = workload.setup(seed)
        if device != "cpu":
            _to_device(problem, device, workload.name)
        optimizer = spec.build(problem.model, hparams)
        if diagnose:
            diagnoser = Diagnoser(diagnose, problem, readings)
        limit = math.inf

        def check(train_loss: float | None) -> bool:
            nonlocal hit
            val_loss, val_metric = _evaluate(problem, "val")
            curve.append(CurvePoint(step, seconds, train_loss, val_loss, val_metric))
            if not (math.isfinite(val_loss) and math.isfinite(val_metric)):
                return False
            if hit is None and reached(val_metric, workload.target, workload.higher_is_better):
                hit = (step, seconds)
            if diagnoser is not None:
                diagnoser.measure(step)
            return True

        check(None)
        for step in range(1, workload.steps + 1):  # ``check`` reads ``step``
            holder: list[torch.Tensor] = []

            def closure(step: int = step, holder: list = holder) -> torch.Tensor:
                optimizer.zero_grad(set_to_none=True)
                loss = problem.train_loss(step - 1)
                loss.backward()
                holder.append(loss)
                return loss

            evaluates = step % workload.eval_every == 0 or step == workload.steps
            if diagnoser is not None:
                diagnoser.before_step(evaluates)
            start = time.perf_counter()
            optimizer.step(closure)
            if cuda:
                torch.cuda.synchronize()
            loss_value = float(holder[0].detach()) if holder else math.nan
            seconds += time.perf_counter() - start
            if step == 1:
                limit = EXPLODE_FACTOR * (abs(loss_value) + 1.0)
            window.append(loss_value)
            if not math.isfinite(loss_value) or loss_value > limit:
                return _diverged(curve, step, seconds, hit, f"training loss {loss_value:g}",
                                 readings)
            if evaluates:
                if not check(sum(window) / len(window)):
                    return _diverged(curve, step, seconds, hit, "non-finite evaluation",
                                     readings)
                window = []
        test_loss, test_metric = _evaluate(problem, "test")
    except Exception as exc:
        return TrialOutcome("failed", error=f"{type(exc).__name__}: {exc}"[:500],
                            curve=tuple(curve), steps_done=max(step - 1, 0),
                            train_seconds=seconds, diagnostics=tuple(readings))
    last = curve[-1]
    return TrialOutcome(
        "ok",
        steps_to_target=hit[0] if hit else None,
        seconds_to_target=hit[1] if hit else None,
        final_train_loss=last.train_loss, final_val_loss=last.val_loss,
        final_val_metric=last.val_metric,
        final_test_loss=_finite(test_loss), final_test_metric=_finite(test_metric),
        train_seconds=seconds, steps_done=workload.steps, curve=tuple(curve),
        diagnostics=tuple(readings),
    )


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _diverged(curve: list[CurvePoint], step: int, seconds: float, hit: Any,
              why: str, readings: list[Diagnostic]) -> TrialOutcome:
    # A divergence after reaching the target still counts as reaching it at that time
    # (AlgoPerf stops at the target); the final metrics are undefined.
    return TrialOutcome(
        "diverged", divergence=f"diverged at step {step}: {why}",
        steps_to_target=hit[0] if hit else None, seconds_to_target=hit[1] if hit else None,
        steps_done=step, train_seconds=seconds, curve=_finite_curve(curve),
        diagnostics=tuple(readings),
    )


def _finite_curve(curve: list[CurvePoint]) -> tuple[CurvePoint, ...]:
    return tuple(p for p in curve if all(v is None or math.isfinite(v) for v in p[2:]))
