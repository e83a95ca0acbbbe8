"""One trial: time to target, divergence (NaN guard), failures, determinism; the store."""

import math
import sqlite3

import pytest
import torch

from gradkit.bench.optimizers import resolve_optimizer
from gradkit.bench.records import (
    OUTCOME_COLUMNS,
    CurvePoint,
    Diagnostic,
    TrialOutcome,
    TrialRecord,
)
from gradkit.bench.runner import TrialTask, run_trial
from gradkit.bench.store import Store
from gradkit.bench.workloads import resolve_workload
from gradkit.errors import UsageError

QUAD = {"dim": 10, "steps": 40, "eval_every": 5, "target": 0.5}


class _NaNOptimizer(torch.optim.Optimizer):
    """Writes NaN into the parameters at the third step."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})
        self.calls = 0

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            loss = closure()
        self.calls += 1
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad, alpha=-group["lr"])
                if self.calls == 3:
                    p.fill_(math.nan)
        return loss


def _spec(name):
    return resolve_optimizer(name)


def test_time_to_target_is_the_first_evaluation_meeting_the_target():
    workload = resolve_workload("quadratic", QUAD)
    out = run_trial(workload, _spec("sgd"), {"lr": 0.5, "momentum": 0.9}, seed=0)
    assert out.status == "ok" and out.steps_done == 40
    steps = [point.step for point in out.curve]
    assert steps == list(range(0, 41, 5))
    first = next(point for point in out.curve if point.val_metric <= 0.5)
    assert out.steps_to_target == first.step > 0
    assert all(p.val_metric > 0.5 for p in out.curve if p.step < first.step)
    seconds = [point.seconds for point in out.curve]
    assert seconds == sorted(seconds) and out.seconds_to_target == first.seconds
    assert out.final_val_metric == out.curve[-1].val_metric
    assert out.final_test_metric is not None


def test_trials_are_deterministic_in_step_based_outcomes():
    workload = resolve_workload("logreg", {"steps": 30, "eval_every": 5})
    a = run_trial(workload, _spec("adam"), {"lr": 0.01}, seed=1)
    b = run_trial(workload, _spec("adam"), {"lr": 0.01}, seed=1)
    c = run_trial(workload, _spec("adam"), {"lr": 0.01}, seed=2)
    strip = lambda out: [p._replace(seconds=0) for p in out.curve]  # noqa: E731
    assert strip(a) == strip(b) and strip(a) != strip(c)


def test_divergence_is_an_outcome_not_a_crash():
    workload = resolve_workload("rosenbrock", {"steps": 100})
    out = run_trial(workload, _spec("sgd"), {"lr": 1.0, "momentum": 0.9}, seed=0)
    assert out.status == "diverged" and "diverged at step" in out.divergence
    assert out.error is None
    assert out.steps_to_target is None and out.final_val_metric is None
    assert out.steps_done < 100


def test_nan_guard_catches_nan_parameters():
    workload = resolve_workload("quadratic", QUAD)
    spec = resolve_optimizer("tests.bench.fixture_user:SignSGD")
    spec = type(spec)("nan", _NaNOptimizer, spec.search, spec.defaults, {})
    out = run_trial(workload, spec, {"lr": 0.1}, seed=0)
    assert out.status == "diverged" and out.steps_done == 4  # loss of step 4 is NaN
    assert all(math.isfinite(p.val_loss) and math.isfinite(p.val_metric) for p in out.curve)


def test_an_optimizer_that_raises_marks_the_trial_failed():
    workload = resolve_workload("quadratic", QUAD)
    out = run_trial(workload, resolve_optimizer("tests.bench.fixture_user:Exploding"),
                    {"lr": 0.1}, seed=0)
    assert out.status == "failed"
    assert out.error == "RuntimeError: boom from Exploding.step"
    out = run_trial(workload, _spec("adam"), {"lr": -1.0}, seed=0)  # raises in __init__
    assert out.status == "failed" and "Invalid learning rate" in out.error


def _outcome(curve_len=3):
    return TrialOutcome(
        "ok", steps_to_target=5, seconds_to_target=0.1, final_train_loss=0.1,
        final_val_loss=0.2, final_val_metric=0.9, final_test_loss=0.3, final_test_metric=0.8,
        train_seconds=1.0, steps_done=10,
        curve=tuple(CurvePoint(5 * k, 0.1 * k, None if k == 0 else 1.0, 0.5, 0.9)
                    for k in range(curve_len)),
        diagnostics=(Diagnostic(5, "grad_norm", 1.5), Diagnostic(5, "sharpness", None)))


def _task(key):
    return TrialTask(key, "s", "w", "{}", "o", '{"lr":0.1}', 0, "tune", 0)


def test_store_records_once_with_the_whole_curve(tmp_path):
    store = Store.create(tmp_path / "r.sqlite")
    store.declare("s", "1", [("w", "w", {"metric": "m", "higher_is_better": True})], [], [])
    outcome = _outcome()
    store.record(_task("k1"), "1", "w", "o", outcome)
    store.record(_task("k1"), "1", "w", "o", _outcome(curve_len=5))  # duplicate key: ignored
    assert store.finished_keys() == {"k1"}
    assert store.curves(["k1"])["k1"] == list(outcome.curve)
    assert store.diagnostics(["k1"])["k1"] == list(outcome.diagnostics)
    (row,) = store.trials("s", "1")
    assert isinstance(row, TrialRecord)
    assert row.hparams == {"lr": 0.1} and row.trial_index == 0 and row.workload == "w"
    assert all(getattr(row, c) == getattr(outcome, c) for c in OUTCOME_COLUMNS)
    store.close()


def test_store_refuses_a_foreign_file(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_text("not a database at all" * 50)
    with pytest.raises(UsageError, match="not a gradkit results database"):
        Store.open_existing(junk)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(UsageError, match="not a gradkit results database"):
        Store.open_existing(other)
    with pytest.raises(UsageError, match="no results database"):
        Store.open_existing(tmp_path / "missing.sqlite")


def test_device_moves_every_builtin_problem_through_its_to_method():
    from gradkit.bench.workloads import BUILTIN

    small = {"transformer": {"p": 7, "d_model": 8, "heads": 2, "d_mlp": 16}}
    for name in BUILTIN:
        workload = resolve_workload(name, {**small.get(name, {}), "steps": 2, "eval_every": 1})
        # "cpu:0" is not "cpu": the trial goes through Problem.to(device) as with "cuda"
        out = run_trial(workload, _spec("sgd"), {"lr": 1e-3}, seed=0, device="cpu:0")
        assert out.status == "ok", (name, out.error)


class _NoTo:
    """A workload whose Problem has no ``to`` (the protocol makes it optional)."""

    name, metric, higher_is_better, target = "no-to", "loss", False, 0.0
    steps, batch_size, eval_every = 2, 1, 1

    def setup(self, seed):
        inner = resolve_workload("quadratic", QUAD).setup(seed)
        problem = type("P", (), {})()
        problem.model, problem.train_loss, problem.evaluate = (
            inner.model, inner.train_loss, inner.evaluate)
        return problem


def test_a_problem_without_to_fails_on_another_device_with_a_clear_error():
    out = run_trial(_NoTo(), _spec("sgd"), {"lr": 0.1}, seed=0, device="cpu:0")
    assert out.status == "failed"
    assert out.error == ("RuntimeError: workload 'no-to' cannot run on cpu:0: its Problem has "
                         "no to(device) method")
    assert run_trial(_NoTo(), _spec("sgd"), {"lr": 0.1}, seed=0).status == "ok"
