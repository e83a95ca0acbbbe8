"""Sharpness, preconditioned sharpness and Hessian trace against dense Hessians of models
whose Hessian is known in closed form (linear regression: H = (2/N) XᵀX)."""

import pytest
import torch
from torch import nn

from gradkit.instruments import (
    HessianTrace,
    PreconditionedSharpness,
    Sharpness,
    hessian_trace,
    preconditioned_sharpness,
    sharpness,
)
from tests.instruments.helpers import monitored_steps

mse = nn.functional.mse_loss


def _linreg(n=40, d=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 2, d,
                                                                              dtype=torch.float64)
    y = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    return model, x, y, 2.0 / n * x.T @ x


def test_sharpness_equals_dense_top_eigenvalues():
    model, x, y, h = _linreg()
    dense = torch.linalg.eigvalsh(h).flip(0)
    got = sharpness(model, mse, (x, y), k=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, dense[:3], rtol=1e-4, atol=0)
    # an iterable of uneven batches is the same dataset
    batches = [(x[:16], y[:16]), (x[16:32], y[16:32]), (x[32:], y[32:])]
    top = sharpness(model, mse, batches, generator=torch.Generator().manual_seed(1))
    assert float(top[0]) == pytest.approx(float(dense[0]), rel=1e-4)


def test_hessian_trace_within_three_standard_errors():
    model, x, y, h = _linreg(seed=1)
    est = hessian_trace(model, mse, (x, y), n_probes=60,
                        generator=torch.Generator().manual_seed(0))
    assert 0 < est.stderr < 0.2 * float(torch.trace(h))
    assert abs(est.estimate - float(torch.trace(h))) < 3 * est.stderr


def test_preconditioned_sharpness_equals_dense_sandwich():
    model, x, y, h = _linreg(seed=2)
    opt = torch.optim.Adam(model.parameters(), lr=0.05, betas=(0.9, 0.99), eps=1e-6)
    for _ in range(5):
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    st = opt.state[model.weight]
    v_hat = st["exp_avg_sq"] / (1 - 0.99 ** float(st["step"]))
    d = (v_hat.sqrt() + 1e-6).rsqrt().reshape(-1)
    dense = float(torch.linalg.eigvalsh(d[:, None] * h * d[None, :]).max())
    got = preconditioned_sharpness(model, mse, (x, y), opt,
                                   generator=torch.Generator().manual_seed(0))
    assert float(got[0]) == pytest.approx(dense, rel=1e-4)


@pytest.mark.parametrize("sgd, factor", [({"lr": 0.1}, 2.0),
                                         ({"lr": 0.1, "momentum": 0.9}, 3.8)])
def test_instruments_record_sharpness_trace_and_thresholds(sgd, factor):
    model, x, y, h = _linreg(seed=3)
    opt = torch.optim.SGD(model.parameters(), **sgd)
    mon = monitored_steps(model, mse, opt, x, y, [Sharpness(every=1), HessianTrace(every=1)])
    rec = mon.history[-1]
    assert rec["sharpness"] == pytest.approx(float(torch.linalg.eigvalsh(h).max()), rel=1e-3)
    assert rec["sharpness_threshold"] == pytest.approx(factor / 0.1)
    assert rec["trace_threshold"] == pytest.approx(2 / 0.1)
    assert abs(rec["hessian_trace"] - float(torch.trace(h))) < 4 * rec["hessian_trace_stderr"]


def test_preconditioned_instrument_waits_for_adam_state():
    model, x, y, _ = _linreg(seed=4)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    mon = monitored_steps(model, mse, opt, x, y, [PreconditionedSharpness(every=1)])
    assert [("precond_sharpness" in r) for r in mon.history] == [True]
    assert mon.history[0]["step"] == 1
    assert mon.history[0]["precond_threshold"] == pytest.approx(38 / 0.01)


def test_thresholds_are_omitted_when_the_learning_rate_is_ambiguous():
    model, x, y, h = _linreg(seed=5)
    opt = torch.optim.SGD([{"params": [model.weight], "lr": 0.1},
                           {"params": [], "lr": 0.2}])
    mon = monitored_steps(model, mse, opt, x, y, [Sharpness(every=1), HessianTrace(every=1)],
                          steps=1)
    rec = mon.history[0]
    assert rec["sharpness"] == pytest.approx(float(torch.linalg.eigvalsh(h).max()), rel=1e-3)
    assert "sharpness_threshold" not in rec and "trace_threshold" not in rec
