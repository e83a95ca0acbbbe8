"""AdamP (Heo et al. 2021): known answers, the projection, a float64 reference, paths, adamp."""

from __future__ import annotations

import math

import pytest
import torch

from gradkit.optim import AdamP
from gradkit.optim._fused import CHUNK
from gradkit.optim._packed import BIG_NUMEL
from gradkit.optim._projection import STACK_BELOW, coefficients, project
from gradkit.optim._tiling import CUT_ABOVE
from tests.optim.conformance import assert_schedule_does_not_recompile

# weight-like tensors whose gradients are made channel-wise / layer-wise orthogonal to the
# weight (so both projection branches fire), a free one, and 1-D / 0-d ones (never projected)
SHAPES = [(4, 6), (3, 2, 2, 2), (5, 3), (6,), ()]
KINDS = ["channel", "layer", "free", "free", "free"]
# fused-path problems: a big tensor (own kernel call), stacked same-shaped ones, packed 1-D
FUSED_SHAPES = [(200, 200), (4, 6), (4, 6), *SHAPES]
FUSED_KINDS = ["channel", "channel", "layer", *KINDS]
# eager paths: tensors of at least _projection.STACK_BELOW elements are tested one at a time
# (three of one shape, one of each branch); on the foreach path, those above
# _tiling.CUT_ABOVE bytes that are channel-projected or not projected (decided from p and g
# first) are stepped in pieces of rows (a 1-D one in flat pieces). Beside them a stack of
# small ones and a small 1-D one.
BIG_SHAPES = [(256, 128), (256, 128), (256, 128), (64, 8, 8, 8), (128, 300), (600, 300),
              (700, 200), (140_000,), (330, 8, 8, 8), (4, 6), (4, 6), (6,)]
BIG_KINDS = ["channel", "layer", "free", "layer", "free", "channel", "free", "free", "layer",
             "channel", "free", "free"]


def reference_projection(p, g, u, delta, wd_ratio, eps):
    """The channel-then-layer projection exactly as the AdamP docstring states it (float64)."""
    if p.ndim <= 1:
        return u, 1.0
    for rows in (p.shape[0], 1):
        p2, g2, u2 = p.reshape(rows, -1), g.reshape(rows, -1), u.reshape(rows, -1)
        dot = (g2 * p2).sum(1)
        cos = dot.abs() / (g2.norm(dim=1).clamp_min(eps) * p2.norm(dim=1).clamp_min(eps))
        if cos.max() < delta / math.sqrt(p2.shape[1]):
            p_hat = p2 / (p2.norm(dim=1, keepdim=True) + eps)
            u2 = u2 - p_hat * (p_hat * u2).sum(1, keepdim=True)
            return u2.reshape(p.shape), wd_ratio
    return u, 1.0


def make_grads(thetas, kinds, gen):
    """Random gradients; "channel" ones orthogonal to each row of θ, "layer" ones to all of θ."""
    grads = []
    for theta, kind in zip(thetas, kinds):
        g = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
        if kind != "free":
            rows = theta.shape[0] if kind == "channel" else 1
            t2, g2 = theta.double().reshape(rows, -1), g.reshape(rows, -1)
            g2 = g2 - t2 * (g2 * t2).sum(1, keepdim=True) / (t2 * t2).sum(1, keepdim=True)
            g = g2.reshape(theta.shape)
        grads.append(g.to(theta.dtype))
    return grads


def reference_adamp(thetas, steps, kinds, *, lr, betas=(0.9, 0.999), eps=1e-8, wd=0.0,
                    delta=0.1, wd_ratio=0.1, nesterov=False, seed=0):
    """AdamP from the equations of its docstring (float64); gradients from make_grads."""
    b1, b2 = betas
    gen = torch.Generator().manual_seed(seed)
    thetas = [t.clone() for t in thetas]
    m = [torch.zeros_like(t) for t in thetas]
    v = [torch.zeros_like(t) for t in thetas]
    for t in range(1, steps + 1):
        grads = make_grads(thetas, kinds, gen)
        for i, g in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            denom = v[i].sqrt() / math.sqrt(1 - b2**t) + eps
            u = (b1 * m[i] + (1 - b1) * g) / denom if nesterov else m[i] / denom
            u, r = reference_projection(thetas[i], g, u, delta, wd_ratio, eps)
            if wd > 0:
                thetas[i] = thetas[i] * (1 - lr * wd * r)
            thetas[i] = thetas[i] - lr / (1 - b1**t) * u
    return thetas


def run_with_grads(factory, thetas, steps, kinds, seed=0):
    params = [torch.nn.Parameter(t.clone()) for t in thetas]
    opt = factory(params)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p, g in zip(params, make_grads([p.detach() for p in params], kinds, gen)):
            p.grad = g
        opt.step()
    return [p.detach() for p in params], opt


def initial(dtype=torch.float64, shapes=SHAPES):
    gen = torch.Generator().manual_seed(42)
    return [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]


def assert_same_trajectory(factory, expected, thetas, steps, kinds, *, rtol=1e-10,
                           atol=1e-12):
    """Run ``factory`` from ``thetas``; compare (in float64) with ``expected(thetas64, steps,
    kinds)`` -- a reference function or another optimizer factory. Returns our optimizer."""
    got, opt = run_with_grads(factory, thetas, steps, kinds)
    want = expected([t.double() for t in thetas], steps, kinds)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol)
    return opt


def package_trajectory(factory):
    """``expected`` for :func:`assert_same_trajectory` from an optimizer factory."""
    return lambda thetas, steps, kinds: run_with_grads(factory, thetas, steps, kinds)[0]


FUSED_SMOKE_SHAPES = [(200, 200), *SHAPES]
FUSED_SMOKE_KINDS = ["channel", *KINDS]


# ------------------------------------------------------------------------- known answers
def test_kat_orthogonal_gradient_is_projected():
    p = torch.nn.Parameter(torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    opt = AdamP([p], lr=0.01)
    p.grad = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([[0.988, 2.006]], dtype=torch.float64),
                               rtol=0, atol=1e-7)
    step = p.detach() - torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    assert (step * torch.tensor([[1.0, 2.0]], dtype=torch.float64)).sum().abs() < 1e-7


def test_kat_one_dimensional_tensor_is_not_projected():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = AdamP([p], lr=0.01)
    p.grad = torch.tensor([2.0, -1.0], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.99, 2.01], dtype=torch.float64),
                               rtol=0, atol=1e-7)


@pytest.mark.parametrize("path", ["loop", "foreach"])
def test_delta_zero_is_adamw(path):
    """δ = 0: the test never passes, so AdamP is AdamW with the same decoupled decay."""
    thetas = initial()
    kw = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.3)
    ours, _ = run_with_grads(lambda ps: AdamP(ps, delta=0.0, foreach=path == "foreach", **kw),
                             thetas, 50, KINDS)
    theirs, _ = run_with_grads(lambda ps: torch.optim.AdamW(ps, foreach=False, **kw),
                               thetas, 50, KINDS)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------------------- projection
def _project_one(p, g, u, delta=0.1, eps=1e-8):
    """The readable projection (``_single_tensor_adamp``'s); whether it projected."""
    new_u, ratio = project(p, g, u.clone(), delta, 0.1, eps)
    return new_u, ratio == 0.1


def _project_batched(ps, gs, us, delta=0.1, eps=1e-8):
    """The branch-free projection of the foreach path and the kernels, on a stack."""
    coef, ok = coefficients(ps, gs, us, delta**2, eps)
    return us - ps * coef, ok


def test_projection_channel_branch_removes_each_rows_radial_part():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    g = make_grads([p], ["channel"], gen)[0]
    u = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    new_u, ok = _project_one(p, g, u)
    assert ok  # radial part removed up to the eps in p / (||p|| + eps)
    torch.testing.assert_close((new_u * p).sum(1), torch.zeros(4, dtype=torch.float64),
                               rtol=0, atol=1e-7)
    assert (u * p).sum(1).abs().min() > 1e-2
    expected, ratio = reference_projection(p, g, u, 0.1, 0.1, 1e-8)
    assert ratio == 0.1
    torch.testing.assert_close(new_u, expected, rtol=1e-12, atol=1e-14)


def test_projection_layer_branch_when_channel_test_fails():
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    g = make_grads([p], ["layer"], gen)[0]
    u = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    new_u, ok = _project_one(p, g, u)
    assert ok
    row_dots = (new_u * p).sum(1)
    assert row_dots.abs().max() > 1e-3  # not per row ...
    assert abs(row_dots.sum().item()) < 1e-7  # ... but for the layer as a whole
    torch.testing.assert_close(new_u, reference_projection(p, g, u, 0.1, 0.1, 1e-8)[0],
                               rtol=1e-12, atol=1e-14)


def test_projection_not_applied_to_scale_variant_weights():
    gen = torch.Generator().manual_seed(2)
    p = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    g = p + 0.1 * torch.randn(3, 5, generator=gen, dtype=torch.float64)
    u = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    new_u, ok = _project_one(p, g, u)
    assert not ok
    assert torch.equal(new_u, u)


def test_projection_zero_row_and_conv_weight_match_reference():
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    p[1] = 0.0  # zero-norm channel: passes the test, p̂ ≈ 0 leaves its update alone
    g = make_grads([p + (p == 0)], ["channel"], gen)[0] * (p != 0)
    u = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    new_u, ok = _project_one(p, g, u)
    assert ok
    torch.testing.assert_close(new_u[1], u[1], rtol=0, atol=0)
    torch.testing.assert_close(new_u, reference_projection(p, g, u, 0.1, 0.1, 1e-8)[0],
                               rtol=1e-12, atol=1e-14)


def test_batched_projection_equals_one_at_a_time():
    gen = torch.Generator().manual_seed(4)
    ps = torch.randn(5, 4, 3, generator=gen, dtype=torch.float64)
    kinds = ["channel", "layer", "free", "channel", "free"]
    gs = torch.stack(make_grads(list(ps), kinds, gen))
    us = torch.randn(5, 4, 3, generator=gen, dtype=torch.float64)
    batched, ok = _project_batched(ps, gs, us)
    for i in range(5):
        one, ok_i = _project_one(ps[i], gs[i], us[i])
        assert bool(ok[i]) == ok_i == (kinds[i] != "free")
        torch.testing.assert_close(batched[i], one, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- trajectories, paths, anchors
@pytest.mark.parametrize("path", ["loop", "foreach"])
@pytest.mark.parametrize(("wd", "nesterov"), [(0.0, False), (0.2, False), (0.2, True)])
def test_float64_parity_with_reference_over_100_steps(path, wd, nesterov):
    thetas = initial()
    kw = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, delta=0.1, wd_ratio=0.3)
    expected = reference_adamp(thetas, 100, KINDS, wd=wd, nesterov=nesterov, **kw)
    got, _ = run_with_grads(lambda ps: AdamP(ps, weight_decay=wd, nesterov=nesterov,
                                             foreach=path == "foreach", **kw),
                            thetas, 100, KINDS)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", ["loop", "foreach"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_large_tensors_on_eager_paths_match_reference(path, nesterov):
    """Large weights skip the stacked branch-free projection and are not materialised unless
    projected: every branch (channel, layer, none) still follows the equations."""
    assert min(math.prod(s) for s in BIG_SHAPES[:9]) >= STACK_BELOW
    assert min(math.prod(s) * 8 for s in BIG_SHAPES[5:9]) > CUT_ABOVE
    kw = dict(lr=1e-2, nesterov=nesterov)
    assert_same_trajectory(
        lambda ps: AdamP(ps, weight_decay=0.2, foreach=path == "foreach", **kw),
        lambda *a: reference_adamp(*a, wd=0.2, **kw), initial(shapes=BIG_SHAPES), 6, BIG_KINDS)


def test_foreach_stacks_same_shaped_tensors_and_matches_loop():
    shapes = [(4, 6)] * 3 + [(3, 2, 2, 2)] * 2 + [(6,)]
    kinds = ["channel", "layer", "free", "channel", "free", "free"]
    thetas = initial(shapes=shapes)
    a, _ = run_with_grads(lambda ps: AdamP(ps, weight_decay=0.1, foreach=False), thetas, 10,
                          kinds)
    b, _ = run_with_grads(lambda ps: AdamP(ps, weight_decay=0.1, foreach=True), thetas, 10,
                          kinds)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-15)


def test_fused_matches_reference_and_lr_changes_do_not_recompile():
    opt = assert_same_trajectory(
        lambda ps: AdamP(ps, lr=1e-2, weight_decay=0.1, fused=True),
        lambda *a: reference_adamp(*a, lr=1e-2, wd=0.1),
        initial(torch.float32, FUSED_SMOKE_SHAPES), 8, FUSED_SMOKE_KINDS, rtol=1e-5, atol=1e-6)
    assert_schedule_does_not_recompile(opt)


@pytest.mark.slow  # compiles a second kernel variant (~20 s cold)
def test_fused_chunked_big_tensors_match_reference():
    """More big weights than ``_fused.CHUNK`` (channel, layer and unprojected ones, different
    sizes in one chunk): several per compiled call, the remainder one call each."""
    shapes = [(200, 200), (64, 600), (200, 200), (300, 120), (200, 200), (6,)]
    kinds = ["channel", "layer", "free", "channel", "layer", "free"]
    assert sum(math.prod(s) >= BIG_NUMEL for s in shapes) > CHUNK
    assert_same_trajectory(lambda ps: AdamP(ps, lr=1e-2, weight_decay=0.1, fused=True),
                           lambda *a: reference_adamp(*a, lr=1e-2, wd=0.1),
                           initial(torch.float32, shapes), 4, kinds, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("nesterov", [False, True])
def test_fused_float64_parity_with_reference_over_100_steps(nesterov):
    kw = dict(lr=1e-2, nesterov=nesterov)
    assert_same_trajectory(lambda ps: AdamP(ps, weight_decay=0.2, fused=True, **kw),
                           lambda *a: reference_adamp(*a, wd=0.2, **kw),
                           initial(shapes=FUSED_SHAPES), 100, FUSED_KINDS)


@pytest.mark.parametrize("nesterov", [False, True])
def test_matches_adamp_package(nesterov):
    adamp = pytest.importorskip("adamp", reason="the authors' adamp package is not installed")
    thetas = initial()
    kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, delta=0.1, wd_ratio=0.1,
              nesterov=nesterov)
    assert_same_trajectory(lambda ps: AdamP(ps, **kw),
                           package_trajectory(lambda ps: adamp.AdamP(ps, **kw)), thetas, 50, KINDS)
    assert_same_trajectory(lambda ps: AdamP(ps, **kw),
                           package_trajectory(lambda ps: adamp.AdamP(ps, **kw)),
                           initial(shapes=BIG_SHAPES), 4, BIG_KINDS)
