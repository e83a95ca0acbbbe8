"""MeZO: seed regeneration (bitwise), known answers, float64 parity with a reference written
from the equations, resume, bad closures and hyperparameters."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

from gradkit.optim import MeZO, create
from gradkit.optim.mezo import perturbation_seeds
from tests.optim.roundtrip import assert_bitwise_resume

F64 = torch.float64


def directions(shapes, seed: int, dtype=F64) -> list[torch.Tensor]:
    """z for ``seed``, drawn independently of the optimizer: one CPU generator, in order."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype) for shape in shapes]


def test_the_same_direction_is_used_in_both_passes_and_the_update_bitwise():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 3))
    b = nn.Parameter(torch.randn(3))
    start = [w.detach().clone(), b.detach().clone()]
    seen = []

    def closure():
        seen.append([w.detach().clone(), b.detach().clone()])
        return ((w.sum(0) + b) ** 2).sum()

    eps, lr = 1e-2, 0.05
    opt = MeZO([w, b], lr=lr, eps=eps, seed=7, check_determinism=False)
    opt.step(closure)
    z = directions([w.shape, b.shape], perturbation_seeds(7, 1, 1)[0], torch.float32)
    plus = [torch.add(t, zt, alpha=eps) for t, zt in zip(start, z)]
    minus = [torch.add(t, zt, alpha=-2 * eps) for t, zt in zip(plus, z)]
    restored = [torch.add(t, zt, alpha=eps) for t, zt in zip(minus, z)]
    for got, want in zip(seen[0] + seen[1], plus + minus):
        assert torch.equal(got, want)
    d = (((plus[0].sum(0) + plus[1]) ** 2).sum().item()
         - ((minus[0].sum(0) + minus[1]) ** 2).sum().item()) / (2 * eps)
    assert opt.state[w]["projected_grads"].item() == pytest.approx(d, rel=0, abs=0)
    for p, t, zt in zip((w, b), restored, z):
        assert torch.equal(p.detach(), torch.add(t, zt, alpha=-lr * d))


def test_quadratic_known_answer():
    torch.manual_seed(1)
    theta = nn.Parameter(torch.randn(10, dtype=F64))
    start = theta.detach().clone()
    opt = MeZO([theta], lr=0.3, eps=1e-3, seed=3)
    opt.step(lambda: 0.5 * (theta ** 2).sum())
    (z,) = directions([(10,)], perturbation_seeds(3, 1, 1)[0])
    torch.testing.assert_close(theta.detach(), start - 0.3 * (start @ z) * z,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eps", [1e-4, 1.0, 100.0])
def test_linear_loss_gives_the_directional_derivative_for_every_eps(eps):
    a = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    theta = nn.Parameter(torch.zeros(3, dtype=F64))
    opt = MeZO([theta], lr=0.0, eps=eps, seed=11)
    opt.step(lambda: a @ theta)
    (z,) = directions([(3,)], perturbation_seeds(11, 1, 1)[0])
    assert opt.state[theta]["projected_grads"].item() == pytest.approx((a @ z).item(),
                                                                       rel=1e-9)


def test_many_perturbations_average_to_the_gradient():
    a = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    theta = nn.Parameter(torch.zeros(3, dtype=F64))
    MeZO([theta], lr=1.0, eps=1e-2, n_perturbations=4000, seed=5).step(lambda: a @ theta)
    # θ' = -(1/n) Σ d_i z_i, and E[d z] = a; std of each entry ≈ |a| / √n ≈ 0.04
    torch.testing.assert_close(-theta.detach(), a, rtol=0, atol=0.15)


def test_parameters_are_restored_in_float64():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(F64)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(6, 4, dtype=F64)
    MeZO(model.parameters(), lr=0.0, eps=1e-3, n_perturbations=3).step(
        lambda: model(x).pow(2).mean())
    for p, q in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-12)


def _reference_mezo(params, loss_fn, steps, *, lrs, decays, eps, n, seed):
    """MeZO from the update rule, out of place: θ ± εz evaluated as new tensors."""
    params = [p.detach().clone() for p in params]
    for t in range(1, steps + 1):
        estimates = []
        for s in perturbation_seeds(seed, t, n):
            z = directions([p.shape for p in params], s)
            plus = loss_fn([p + eps * zi for p, zi in zip(params, z)])
            minus = loss_fn([p - eps * zi for p, zi in zip(params, z)])
            estimates.append(((plus - minus) / (2 * eps), z))
        grads = [wd * p for p, wd in zip(params, decays)]
        for d, z in estimates:
            grads = [g + d / n * zi for g, zi in zip(grads, z)]
        params = [p - lr * g for p, g, lr in zip(params, grads, lrs)]
    return params


@pytest.mark.parametrize(("n", "weight_decay"), [(1, 0.0), (1, 0.1), (3, 0.05)])
def test_float64_parity_with_the_equations(n, weight_decay):
    torch.manual_seed(3)
    x, y = torch.randn(20, 4, dtype=F64), torch.randn(20, 1, dtype=F64)
    w1, b1 = torch.randn(6, 4, dtype=F64), torch.randn(6, dtype=F64)
    w2 = torch.randn(1, 6, dtype=F64)

    def loss_fn(ps):
        return ((torch.tanh(x @ ps[0].T + ps[1]) @ ps[2].T - y) ** 2).mean()

    ref = _reference_mezo([w1, b1, w2], loss_fn, 8, lrs=[0.02, 0.02, 0.05],
                          decays=[weight_decay, 0.0, weight_decay], eps=1e-3, n=n, seed=9)
    params = [nn.Parameter(t.clone()) for t in (w1, b1, w2)]
    opt = MeZO([{"params": [params[0]]},
                {"params": [params[1]], "weight_decay": 0.0},
                {"params": [params[2]], "lr": 0.05}],
               lr=0.02, eps=1e-3, weight_decay=weight_decay, n_perturbations=n, seed=9)
    for _ in range(8):
        opt.step(lambda: loss_fn(params))
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-10, atol=1e-12)


def _model():
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))


def test_state_dict_round_trip_is_bitwise():
    torch.manual_seed(5)
    x, y = torch.randn(16, 5), torch.randn(16, 2)

    def run(model, opt, start, steps):
        for _ in range(steps):
            opt.step(lambda: nn.functional.mse_loss(model(x), y))

    assert_bitwise_resume(
        _model, lambda m: MeZO(m.parameters(), lr=1e-2, eps=1e-3, n_perturbations=2, seed=1),
        run, build_fresh_opt=lambda m: MeZO(m.parameters(), lr=1.0, seed=2))


def test_loss_decreases_and_registry():
    torch.manual_seed(6)
    x = torch.randn(64, 5)
    y = x @ torch.randn(5, 2)
    model = _model()
    opt = create("mezo", model.parameters(), lr=2e-2, eps=1e-3, seed=0)
    assert isinstance(opt, MeZO)
    losses = [opt.step(lambda: nn.functional.mse_loss(model(x), y)) for _ in range(300)]
    assert sum(losses[-20:]) / 20 < 0.7 * sum(losses[:20]) / 20


def test_closure_without_a_loss_is_refused():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = MeZO(model.parameters())
    with pytest.raises(TypeError, match="closure that returns the loss"):
        opt.step()
    with pytest.raises(TypeError, match=r"closure that returns the loss.*got NoneType"):
        opt.step(lambda: None)
    with pytest.raises(TypeError, match="scalar loss"):
        opt.step(lambda: model(torch.randn(3, 5)))
    for p, q in zip(model.parameters(), before):  # θ restored (to rounding) after failures
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-6)


def test_closure_calling_backward_gets_an_explanation():
    model = _model()
    x = torch.randn(4, 5)
    opt = MeZO(model.parameters())

    def closure():
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match=r"without calling backward\(\)"):
        opt.step(closure)


def test_dropout_in_train_mode_is_refused_with_an_explanation():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(5, 32), nn.Dropout(0.5), nn.Linear(32, 1))
    x = torch.randn(8, 5)
    before = [p.detach().clone() for p in model.parameters()]
    opt = MeZO(model.parameters(), lr=1e-2)
    with pytest.raises(RuntimeError, match=r"not deterministic.*model\.eval\(\)"):
        opt.step(lambda: model(x).pow(2).mean())
    for p, q in zip(model.parameters(), before):  # θ + εz - εz: restored to rounding
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-6)
    model.eval()
    opt.step(lambda: model(x).pow(2).mean())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (dict(eps=0.0), "Invalid eps value: 0.0"),
    (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    (dict(n_perturbations=0), "Invalid n_perturbations value: 0"),
    (dict(seed=-3), "Invalid seed value: -3"),
])
def test_bad_hyperparameters_raise_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MeZO(_model().parameters(), **kwargs)


def test_docstring_example_runs_and_prints_what_it_shows():
    tests = doctest.DocTestFinder(recurse=False).find(MeZO, "MeZO", globs={})
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted >= 9 and result.failed == 0
