"""Built-in workloads: protocol fields, determinism, splits, known structure."""

import pytest
import torch

from gradkit.bench.workloads import BUILTIN, resolve_workload, validate
from gradkit.bench.workloads.base import EpochSampler
from gradkit.errors import UsageError

SMALL = {"transformer": {"p": 7, "d_model": 8, "heads": 2, "d_mlp": 16}}


@pytest.mark.parametrize("name", list(BUILTIN))
def test_builtin_is_deterministic_given_the_seed(name):
    workload = resolve_workload(name, SMALL.get(name))
    validate(workload, name)
    a, b, c = workload.setup(3), workload.setup(3), workload.setup(4)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.model.parameters(),
                                                         c.model.parameters()))
    la, lb = a.train_loss(5), b.train_loss(5)
    assert torch.isfinite(la) and la.ndim == 0 and la.requires_grad
    assert float(la.detach()) == float(lb.detach())
    # the same batch for the same step (closure-based optimizers recompute the loss)
    assert float(a.train_loss(5).detach()) == float(la.detach())
    with torch.no_grad():
        for split in ("val", "test"):
            loss, metric = a.evaluate(split)
            assert isinstance(loss, float) and isinstance(metric, float)


@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn", "transformer"])
def test_supervised_splits_are_disjoint_and_fixed(name):
    workload = resolve_workload(name, SMALL.get(name))
    arrays = workload.setup(0).arrays
    rows = {k: {tuple(r.tolist()) for r in getattr(arrays, f"x_{k}")}
            for k in ("train", "val", "test")}
    sizes = {k: len(getattr(arrays, f"x_{k}")) for k in ("train", "val", "test")}
    assert sizes["val"] > 0 and sizes["test"] > 0 and sizes["train"] > sizes["val"]
    if name == "transformer":  # token triples are unique, so the splits must not overlap
        assert not rows["train"] & rows["val"] and not rows["val"] & rows["test"]
    torch.testing.assert_close(workload.setup(5).arrays.x_val, arrays.x_val)


def test_epoch_sampler_visits_every_example_once_per_epoch():
    sampler = EpochSampler(n=10, batch_size=3, seed=1)  # 3 batches per epoch, 1 left out
    epoch0 = torch.cat([sampler.indices(k) for k in range(3)])
    assert len(set(epoch0.tolist())) == 9
    epoch1 = torch.cat([sampler.indices(k) for k in range(3, 6)])
    assert not torch.equal(epoch0, epoch1)
    torch.testing.assert_close(sampler.indices(1), epoch0[3:6])  # going back is consistent


def test_noisy_quadratic_gradient_statistics():
    """Minibatch gradient = Hx + noise with mean 0 and variance noise^2 * h / B."""
    workload = resolve_workload("quadratic", {"dim": 4, "batch_size": 8, "noise": 2.0})
    problem = workload.setup(0)
    h = torch.arange(1, 5, dtype=torch.float32).pow(-1.0)
    grads = []
    for step in range(4000):
        problem.model.zero_grad()
        problem.train_loss(step).backward()
        grads.append(problem.model.x.grad.clone())
    g = torch.stack(grads)
    x = problem.model.x.detach()
    torch.testing.assert_close(g.mean(0), h * x, atol=0.05, rtol=0)
    torch.testing.assert_close(g.var(0), 4.0 * h / 8, rtol=0.08, atol=0)
    assert problem.evaluate("val")[1] == pytest.approx(float(0.5 * (h * x * x).sum()))


def test_rosenbrock_value_and_minimum():
    problem = resolve_workload("rosenbrock", {"dim": 4}).setup(0)
    with torch.no_grad():
        problem.model.x.copy_(torch.ones(4))
    assert problem.evaluate("val") == (0.0, 0.0)
    with torch.no_grad():
        problem.model.x.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0]))
    # 100(1-0)^2 + 1 + 100(0-1)^2 + 0 + 100(0-0)^2 + 1
    assert problem.evaluate("val")[0] == pytest.approx(202.0)


def test_user_workload_by_module_attr_and_bad_specs():
    workload = resolve_workload("tests.bench.fixture_user:make_workload")
    assert workload.name == "linreg" and not workload.higher_is_better
    assert resolve_workload("tests.bench.fixture_user:LinearRegression").name == "linreg"
    for spec, message in [
        ("nope", "unknown workload 'nope'; valid: quadratic"),
        ("tests.bench.fixture_user:missing", "has no attribute 'missing'"),
        ("tests.bench.no_such_module:f", "cannot import module"),
        ("tests.bench.fixture_user:broken_factory", "factory raised RuntimeError"),
        ("tests.bench.fixture_user:not_a_workload", "does not follow the workload protocol"),
        ("a:b:c", "malformed workload"),
    ]:
        with pytest.raises(UsageError, match=message):
            resolve_workload(spec)


def test_char_lm_trains_on_the_text_shipped_with_scikit_learn():
    import hashlib

    from gradkit.bench.optimizers import resolve_optimizer
    from gradkit.bench.runner import run_trial
    from gradkit.bench.workloads.text import corpus

    text = corpus()
    assert len(text) > 20_000 and "Iris" in text  # real English prose, read offline
    workload = resolve_workload("char-lm", {"steps": 20, "eval_every": 10})
    assert hashlib.sha256(text.encode()).hexdigest()[:12] in workload.description
    arrays = workload.setup(0).arrays
    assert torch.equal(arrays.y_train[0, :-1], arrays.x_train[0, 1:])  # next character
    decoded = "".join(workload.vocab[i] for i in arrays.x_train[0].tolist())
    assert decoded == text[: workload.context]
    out = run_trial(workload, resolve_optimizer("adam"), {"lr": 1e-2}, seed=0)
    assert out.status == "ok"
    assert out.curve[-1].val_metric < out.curve[0].val_metric - 1.0  # bits/char fall
