"""SGDP (Heo et al., ICLR 2021): known answers, a float64 reference, paths, the adamp package."""

from __future__ import annotations

import pytest
import torch

from gradkit.optim import SGDP
from tests.optim.conformance import assert_schedule_does_not_recompile
from tests.optim.test_adamp import (
    BIG_KINDS,
    BIG_SHAPES,
    FUSED_KINDS,
    FUSED_SHAPES,
    FUSED_SMOKE_KINDS,
    FUSED_SMOKE_SHAPES,
    KINDS,
    assert_same_trajectory,
    initial,
    make_grads,
    package_trajectory,
    reference_projection,
    run_with_grads,
)


def reference_sgdp(thetas, steps, kinds, *, lr, momentum=0.0, dampening=0.0, wd=0.0,
                   nesterov=False, eps=1e-8, delta=0.1, wd_ratio=0.1, seed=0):
    """SGDP from the equations of its docstring (float64). As in the authors' sgdp.py,
    without nesterov the projected direction replaces the momentum buffer (their projection
    works in place)."""
    gen = torch.Generator().manual_seed(seed)
    thetas = [t.clone() for t in thetas]
    bufs = [torch.zeros_like(t) for t in thetas]
    for _ in range(steps):
        grads = make_grads(thetas, kinds, gen)
        for i, g in enumerate(grads):
            bufs[i] = momentum * bufs[i] + (1 - dampening) * g
            d = g + momentum * bufs[i] if nesterov else bufs[i]
            d, r = reference_projection(thetas[i], g, d, delta, wd_ratio, eps)
            if not nesterov:
                bufs[i] = d
            if wd > 0:
                thetas[i] = thetas[i] * (1 - lr * wd * r / (1 - momentum))
            thetas[i] = thetas[i] - lr * d
    return thetas


def test_kat_projected_step():
    p = torch.nn.Parameter(torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    opt = SGDP([p], lr=0.1)
    p.grad = torch.tensor([[0.01, 1.0]], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([[1.0, -0.1]], dtype=torch.float64),
                               rtol=0, atol=1e-9)
    plain = torch.nn.Parameter(torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    sgd = torch.optim.SGD([plain], lr=0.1)
    plain.grad = torch.tensor([[0.01, 1.0]], dtype=torch.float64)
    sgd.step()
    torch.testing.assert_close(plain.detach(),
                               torch.tensor([[0.999, -0.1]], dtype=torch.float64))


def test_buffer_starts_at_zero_and_stores_the_projected_direction():
    p = torch.nn.Parameter(torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    opt = SGDP([p], lr=0.1, momentum=0.9, dampening=0.5)
    p.grad = torch.tensor([[0.01, 1.0]], dtype=torch.float64)
    opt.step()
    # buf = 0.9 * 0 + 0.5 * g, then projected off p = [1, 0] (radial part removed)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"],
                               torch.tensor([[0.0, 0.5]], dtype=torch.float64),
                               rtol=0, atol=1e-9)
    q = torch.nn.Parameter(torch.tensor([1.0, 0.0], dtype=torch.float64))  # 1-D: no projection
    opt = SGDP([q], lr=0.1, momentum=0.9, dampening=0.5)
    q.grad = torch.tensor([0.01, 1.0], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(opt.state[q]["momentum_buffer"],
                               torch.tensor([0.005, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("path", ["loop", "foreach"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_delta_zero_is_sgd_with_decoupled_decay_scaled_by_one_over_one_minus_mu(path, nesterov):
    lr, mu, wd = 0.05, 0.9, 0.3
    thetas = initial()
    ours, _ = run_with_grads(lambda ps: SGDP(ps, lr=lr, momentum=mu, weight_decay=wd,
                                             nesterov=nesterov, delta=0.0,
                                             foreach=path == "foreach"), thetas, 40, KINDS)
    params = [torch.nn.Parameter(t.clone()) for t in thetas]
    sgd = torch.optim.SGD(params, lr=lr, momentum=mu, nesterov=nesterov, foreach=False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        grads = make_grads([p.detach() for p in params], KINDS, gen)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.grad = g
                p.mul_(1 - lr * wd / (1 - mu))
        sgd.step()
    for a, b in zip(ours, params):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("path", ["loop", "foreach"])
@pytest.mark.parametrize(("momentum", "dampening", "wd", "nesterov"),
                         [(0.0, 0.0, 0.0, False), (0.9, 0.1, 0.2, False), (0.8, 0.0, 0.2, True)])
def test_float64_parity_with_reference_over_100_steps(path, momentum, dampening, wd, nesterov):
    thetas = initial()
    kw = dict(lr=2e-2, momentum=momentum, dampening=dampening, nesterov=nesterov,
              delta=0.1, wd_ratio=0.3)
    expected = reference_sgdp(thetas, 100, KINDS, wd=wd, **kw)
    got, _ = run_with_grads(lambda ps: SGDP(ps, weight_decay=wd, foreach=path == "foreach",
                                            **kw), thetas, 100, KINDS)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", ["loop", "foreach"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_large_tensors_on_eager_paths_match_reference(path, nesterov):
    """Large weights are tested one at a time; without nesterov a projected buffer is still
    stored projected, an unprojected one untouched."""
    kw = dict(lr=2e-2, momentum=0.9, nesterov=nesterov)
    assert_same_trajectory(
        lambda ps: SGDP(ps, weight_decay=0.2, foreach=path == "foreach", **kw),
        lambda *a: reference_sgdp(*a, wd=0.2, **kw), initial(shapes=BIG_SHAPES), 6, BIG_KINDS)


def test_fused_matches_reference_and_lr_changes_do_not_recompile():
    opt = assert_same_trajectory(
        lambda ps: SGDP(ps, lr=1e-2, momentum=0.9, weight_decay=0.1, fused=True),
        lambda *a: reference_sgdp(*a, lr=1e-2, momentum=0.9, wd=0.1),
        initial(torch.float32, FUSED_SMOKE_SHAPES), 8, FUSED_SMOKE_KINDS, rtol=1e-5, atol=1e-6)
    assert_schedule_does_not_recompile(opt)


@pytest.mark.slow
@pytest.mark.parametrize("nesterov", [False, True])
def test_fused_float64_parity_with_reference_over_100_steps(nesterov):
    kw = dict(lr=2e-2, momentum=0.8, nesterov=nesterov)
    assert_same_trajectory(lambda ps: SGDP(ps, weight_decay=0.2, fused=True, **kw),
                           lambda *a: reference_sgdp(*a, wd=0.2, **kw),
                           initial(shapes=FUSED_SHAPES), 100, FUSED_KINDS)


@pytest.mark.parametrize("nesterov", [False, True])
def test_matches_adamp_package(nesterov):
    adamp = pytest.importorskip("adamp", reason="the authors' adamp package is not installed")
    thetas = initial()
    kw = dict(lr=2e-2, momentum=0.9, weight_decay=0.1, nesterov=nesterov)
    assert_same_trajectory(lambda ps: SGDP(ps, **kw),
                           package_trajectory(lambda ps: adamp.SGDP(ps, **kw)), thetas, 50, KINDS)
    assert_same_trajectory(lambda ps: SGDP(ps, **kw),
                           package_trajectory(lambda ps: adamp.SGDP(ps, **kw)),
                           initial(shapes=BIG_SHAPES), 4, BIG_KINDS)
