"""M-FAC: the matrix-free inverse against dense algebra, float64 parity with a reference
written from the equations, the block-wise variant, known answers, resume, bad input."""

from __future__ import annotations

import copy
import doctest

import pytest
import torch
from torch import nn

from gradkit.optim import MFAC, MFACInverse, create
from tests.optim.roundtrip import assert_bitwise_resume, mse_run

F64 = torch.float64


def dense_fisher(rows: torch.Tensor, m: int, damp: float) -> torch.Tensor:
    """λ I + (1/m) Σ g gᵀ as an explicit d×d matrix."""
    d = rows.shape[1]
    return damp * torch.eye(d, dtype=rows.dtype) + rows.T @ rows / m


def sherman_morrison_inverse(rows: torch.Tensor, m: int, damp: float) -> torch.Tensor:
    """The paper's recursion, dense: H_0⁻¹ = λ⁻¹I, H_i⁻¹ = H_{i−1}⁻¹ − (H g)(H g)ᵀ/(m + gᵀHg)."""
    h = torch.eye(rows.shape[1], dtype=rows.dtype) / damp
    for g in rows:
        hg = h @ g
        h = h - torch.outer(hg, hg) / (m + g @ hg)
    return h


def test_product_is_the_explicit_inverse_after_m_updates():
    torch.manual_seed(0)
    m, d, damp = 32, 1000, 1e-5
    grads = torch.randn(m, d, dtype=F64)
    x = torch.randn(d, dtype=F64)
    inv = MFACInverse(m, d, damp, dtype=F64)
    for g in grads:
        inv.update(g)
    expected = torch.linalg.solve(dense_fisher(grads, m, damp), x)
    # condition number ~ 4e6, so the dense solve itself is good to ~1e-10 in norm
    error = torch.linalg.vector_norm(inv.mul(x) - expected) / torch.linalg.vector_norm(expected)
    assert error < 1e-9


def test_product_matches_the_sherman_morrison_recursion_with_window_overwrites():
    """More gradients than the window: only the last m count (ring buffer), any order."""
    torch.manual_seed(1)
    m, d, damp = 5, 12, 0.3
    grads = torch.randn(13, d, dtype=F64)
    inv = MFACInverse(m, d, damp, dtype=F64)
    x = torch.randn(d, dtype=F64)
    for k, g in enumerate(grads):
        inv.update(g)
        window = grads[max(0, k + 1 - m): k + 1]  # fewer than m rows: the rest are zero
        expected = sherman_morrison_inverse(window, m, damp) @ x
        torch.testing.assert_close(inv.mul(x), expected, rtol=1e-11, atol=1e-13)


def test_first_step_known_answer():
    theta = nn.Parameter(torch.zeros(3, dtype=F64))
    opt = MFAC([theta], lr=0.5, ngrads=4, damp=1.0)
    theta.grad = torch.tensor([1.0, 2.0, 2.0], dtype=F64)
    opt.step()
    expected = -0.5 * torch.tensor([1.0, 2.0, 2.0], dtype=F64) / 3.25
    torch.testing.assert_close(theta.detach(), expected, rtol=1e-15, atol=0)


def test_large_damping_reduces_to_sgd():
    torch.manual_seed(2)
    w1 = nn.Parameter(torch.randn(6, dtype=F64))
    w2 = nn.Parameter(w1.detach().clone())
    damp = 1e9
    mfac = MFAC([w1], lr=0.1 * damp, ngrads=3, damp=damp)
    sgd = torch.optim.SGD([w2], lr=0.1)
    for _ in range(5):
        for w, opt in ((w1, mfac), (w2, sgd)):
            opt.zero_grad()
            (w ** 4).sum().backward()
            opt.step()
    torch.testing.assert_close(w1.detach(), w2.detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("blocksize", [1, 4, 7, 100])
def test_blockwise_is_the_block_diagonal_inverse(blocksize: int):
    torch.manual_seed(3)
    m, d, damp = 6, 23, 0.05
    grads = torch.randn(m, d, dtype=F64)
    inv = MFACInverse(m, d, damp, blocksize, dtype=F64)
    for g in grads:
        inv.update(g)
    x = torch.randn(d, dtype=F64)
    expected = torch.cat([
        torch.linalg.solve(dense_fisher(grads[:, s: s + blocksize], m, damp), x[s: s + blocksize])
        for s in range(0, d, blocksize)])
    torch.testing.assert_close(inv.mul(x), expected, rtol=1e-10, atol=1e-12)
    if blocksize == 1:  # coordinate-wise Sherman–Morrison
        torch.testing.assert_close(inv.mul(x), x / (damp + (grads ** 2).sum(0) / m))


def _reference_mfac(model: nn.Module, x, y, steps: int, *, lr, momentum, weight_decay, m,
                    damp, blocksize=None):
    """MFAC from the update rule: dense (block-diagonal) F̂ and explicit solves."""
    params = list(model.parameters())
    d = sum(p.numel() for p in params)
    block = d if blocksize is None else blocksize
    window = torch.zeros(m, d, dtype=F64)
    v = torch.zeros(d, dtype=F64)
    for t in range(steps):
        model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        with torch.no_grad():
            theta = torch.cat([p.reshape(-1) for p in params])
            g = torch.cat([p.grad.reshape(-1) for p in params]) + weight_decay * theta
            window[t % m] = g
            u = torch.cat([
                torch.linalg.solve(dense_fisher(window[:, s: s + block], m, damp), g[s: s + block])
                for s in range(0, d, block)])
            if momentum > 0:
                v = momentum * v + (1 - momentum) * u
                u = v
            theta = theta - lr * u
            offset = 0
            for p in params:
                p.copy_(theta[offset: offset + p.numel()].view_as(p))
                offset += p.numel()


def _data():
    torch.manual_seed(4)
    return torch.randn(16, 5, dtype=F64), torch.randn(16, 2, dtype=F64)


def _model():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(("momentum", "weight_decay", "blocksize"),
                         [(0.0, 0.0, None), (0.9, 0.01, None), (0.5, 0.0, 8)])
def test_float64_parity_with_the_equations(momentum, weight_decay, blocksize, foreach):
    x, y = _data()
    ref, model = _model(), _model()
    hyper = dict(lr=0.01, momentum=momentum, weight_decay=weight_decay, damp=0.1)
    _reference_mfac(ref, x, y, 12, m=5, blocksize=blocksize, **hyper)
    opt = MFAC(model.parameters(), ngrads=5, blocksize=blocksize, foreach=foreach, **hyper)
    mse_run(x, y)(model, opt, 0, 12)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_state_dict_round_trip_is_bitwise():
    x, y = _data()
    _, _, state = assert_bitwise_resume(
        _model, lambda mod: MFAC(mod.parameters(), lr=0.01, momentum=0.9, ngrads=8, damp=0.1),
        mse_run(x, y))
    assert state["state"][0]["window"].shape == (1, 8, 34)


def test_pickled_optimizer_continues_identically():
    x, y = _data()
    a = _model()
    opt_a = MFAC(a.parameters(), lr=0.01, ngrads=4, damp=0.1)
    mse_run(x, y)(a, opt_a, 0, 3)
    both = copy.deepcopy({"model": a, "opt": opt_a})
    mse_run(x, y)(a, opt_a, 0, 3)
    mse_run(x, y)(both["model"], both["opt"], 0, 3)
    for p, q in zip(a.parameters(), both["model"].parameters()):
        assert torch.equal(p, q)


def test_registry_and_per_group_lr():
    x, y = _data()
    a, b = _model(), _model()
    create("mfac", a.parameters(), lr=0.01, ngrads=4, damp=0.1)
    opt_a = MFAC(a.parameters(), lr=0.01, ngrads=4, damp=0.1)
    opt_b = MFAC([{"params": b[0].parameters(), "lr": 0.0}, {"params": b[2].parameters()}],
                 lr=0.01, ngrads=4, damp=0.1)
    mse_run(x, y)(a, opt_a, 0, 1)
    mse_run(x, y)(b, opt_b, 0, 1)
    assert torch.equal(b[0].weight, _model()[0].weight)  # lr 0: not moved
    assert torch.equal(a[2].weight, b[2].weight)  # one curvature model over both groups
    assert not torch.equal(a[2].weight, _model()[2].weight)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(ngrads=0), "Invalid ngrads value: 0"),
    (dict(ngrads=2.5), "Invalid ngrads value"),
    (dict(damp=0.0), "Invalid damp value: 0.0"),
    (dict(damp=-1e-5), "Invalid damp value: -1e-05"),
    (dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (dict(momentum=1.0), "Invalid momentum value: 1.0"),
    (dict(weight_decay=-1.0), "Invalid weight_decay value: -1.0"),
    (dict(blocksize=0), "Invalid blocksize value: 0"),
])
def test_bad_hyperparameters_raise_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MFAC(_model().parameters(), **kwargs)


def test_groups_must_share_the_curvature_settings():
    model = _model()
    with pytest.raises(ValueError, match="Invalid ngrads value"):
        MFAC([{"params": model[0].parameters(), "ngrads": 4},
              {"params": model[2].parameters()}], ngrads=8)


def test_docstring_example_runs_and_prints_what_it_shows():
    tests = doctest.DocTestFinder(recurse=False).find(MFAC, "MFAC", globs={})
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted >= 6 and result.failed == 0
