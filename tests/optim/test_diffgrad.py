"""diffGrad (Dubey et al.): known answers, an independent float64 reference, paths, anchors."""

from __future__ import annotations

import math

import pytest
import torch

from gradkit.optim import DiffGrad, _fused
from gradkit.optim._packed import BIG_NUMEL
from gradkit.optim._tiling import CUT_ABOVE
from gradkit.optim.diffgrad import PACK_BELOW
from tests.optim.conformance import assert_schedule_does_not_recompile

SHAPES = [(3, 4), (5,), (2, 3, 2), ()]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def reference_diffgrad(thetas, grad_seq, *, lr, betas=(0.9, 0.999), eps=1e-8, wd=0.0,
                       maximize=False, legacy=False):
    """diffGrad v2 written from the equations of its docstring (float64, per tensor)."""
    b1, b2 = betas
    thetas = [t.clone() for t in thetas]
    m = [torch.zeros_like(t) for t in thetas]
    v = [torch.zeros_like(t) for t in thetas]
    prev = [torch.zeros_like(t) for t in thetas]
    for t, grads in enumerate(grad_seq, start=1):
        for i, raw in enumerate(grads):
            g = -raw if maximize else raw
            g = g + wd * thetas[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            xi = 1.0 / (1.0 + torch.exp(-(prev[i] - g).abs()))
            if legacy and t > 1:
                xi = torch.full_like(g, 0.5)
            prev[i] = g
            alpha = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
            thetas[i] = thetas[i] - alpha * xi * m[i] / (v[i].sqrt() + eps)
    return thetas


def _problem(steps, dtype=torch.float64, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    thetas = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    grad_seq = [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
                for _ in range(steps)]
    return thetas, grad_seq


def _run(opt_factory, thetas, grad_seq):
    params = [torch.nn.Parameter(t.clone()) for t in thetas]
    opt = opt_factory(params)
    for grads in grad_seq:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params], opt


def test_kat_first_step_scalar():
    theta = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    opt = DiffGrad([theta])
    theta.grad = torch.ones((), dtype=torch.float64)
    opt.step()
    xi = _sigmoid(1.0)
    assert xi == pytest.approx(0.7310586, abs=1e-7)
    alpha = 1e-3 * math.sqrt(0.001) / 0.1
    expected = -alpha * 0.1 * xi / (math.sqrt(0.001) + 1e-8)
    assert theta.item() == pytest.approx(expected, rel=1e-12)
    assert theta.item() == pytest.approx(-7.3106e-4, abs=1e-8)
    state = opt.state[theta]
    assert state["exp_avg"].item() == pytest.approx(0.1)
    assert state["exp_avg_sq"].item() == pytest.approx(0.001)
    assert state["previous_grad"].item() == 1.0


@pytest.mark.parametrize("legacy", [False, True])
def test_kat_second_step_same_gradient_is_half_adam_step(legacy):
    """g_2 = g_1 gives ξ = 0.5 exactly: half of torch Adam's step from the same state (eps=0)."""
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    theta = torch.nn.Parameter(torch.tensor([0.3, -0.1, 2.0], dtype=torch.float64))
    opt = DiffGrad([theta], lr=0.1, eps=0.0, legacy_alias_bug=legacy)
    theta.grad = g.clone()
    opt.step()
    adam_theta = torch.nn.Parameter(theta.detach().clone())
    adam = torch.optim.Adam([adam_theta], lr=0.1, eps=0.0)
    adam.state[adam_theta] = {k: opt.state[theta][k].clone()
                              for k in ("step", "exp_avg", "exp_avg_sq")}
    before = theta.detach().clone()
    theta.grad = g.clone()
    adam_theta.grad = g.clone()
    opt.step()
    adam.step()
    torch.testing.assert_close(theta.detach() - before, 0.5 * (adam_theta.detach() - before),
                               rtol=1e-12, atol=0)


def test_alias_bug_regression_second_friction_uses_the_previous_gradient():
    """ξ_2 = sigmoid(|g_1 - g_2|) ≠ 0.5, even when zero_grad keeps the grad tensor (the
    original diffGrad.py aliased p.grad and got ξ ≡ 0.5 there); legacy_alias_bug restores it."""
    results = {}
    for legacy in (False, True):
        model = torch.nn.Linear(1, 1, bias=False).double()
        torch.nn.init.constant_(model.weight, 0.5)
        opt = DiffGrad(model.parameters(), lr=0.1, eps=0.0, legacy_alias_bug=legacy)
        grads = []
        for x in (1.0, 3.0):
            opt.zero_grad(set_to_none=False)
            model(torch.tensor([[x]], dtype=torch.float64)).sum().backward()
            grads.append(model.weight.grad.item())
            before = model.weight.item()
            opt.step()
        m = opt.state[model.weight]["exp_avg"].item()
        v = opt.state[model.weight]["exp_avg_sq"].item()
        alpha = 0.1 * math.sqrt(1 - 0.999**2) / (1 - 0.9**2)
        xi = (model.weight.item() - before) / (-alpha * m / math.sqrt(v))
        results[legacy] = (xi, grads)
    xi, (g1, g2) = results[False]
    assert g1 != g2
    assert xi == pytest.approx(_sigmoid(abs(g1 - g2)), rel=1e-12)
    assert xi != pytest.approx(0.5, abs=1e-3)
    assert results[True][0] == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize("path", ["loop", "foreach"])
@pytest.mark.parametrize(("wd", "maximize", "legacy"),
                         [(0.0, False, False), (0.05, True, False), (0.05, False, True)])
def test_float64_parity_with_reference_over_100_steps(path, wd, maximize, legacy):
    thetas, grad_seq = _problem(100)
    expected = reference_diffgrad(thetas, grad_seq, lr=1e-2, betas=(0.8, 0.99), eps=1e-6,
                                  wd=wd, maximize=maximize, legacy=legacy)
    got, _ = _run(lambda ps: DiffGrad(ps, lr=1e-2, betas=(0.8, 0.99), eps=1e-6,
                                      weight_decay=wd, maximize=maximize,
                                      legacy_alias_bug=legacy, foreach=path == "foreach"),
                  thetas, grad_seq)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("path", ["loop", "foreach"])
def test_packed_small_tensors_with_different_step_counts_match_unpacked(path):
    """Small tensors are stepped as one flat pack per step count: the result equals stepping
    each tensor alone (one per optimizer, never packed), also when one starts late."""
    shapes = [(3, 4), (5,), (200, 200), (2, 3, 2), (7,)]
    assert sum(math.prod(s) < PACK_BELOW for s in shapes) == 4 and 200 * 200 >= PACK_BELOW
    thetas, grad_seq = _problem(12, shapes=shapes)
    late = 3  # tensor 3 gets no gradient in the first `late` steps
    kw = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05,
              foreach=path == "foreach")
    params = [torch.nn.Parameter(t.clone()) for t in thetas]
    alone = [torch.nn.Parameter(t.clone()) for t in thetas]
    opt = DiffGrad(params, **kw)
    opts = [DiffGrad([p], **kw) for p in alone]
    for step, grads in enumerate(grad_seq):
        for i, g in enumerate(grads):
            grad = None if i == 3 and step < late else g.clone()
            params[i].grad, alone[i].grad = grad, None if grad is None else grad.clone()
        opt.step()
        for o in opts:
            o.step()
    assert {float(opt.state[p]["step"]) for p in params} == {12.0, 12.0 - late}
    for a, b in zip(params, alone):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("path", ["loop", "foreach"])
def test_tensors_cut_into_cache_pieces_match_reference(path):
    """Weights above _tiling.CUT_ABOVE bytes are stepped in pieces of rows (a 1-D one in flat
    pieces), beside a pack of small ones; the result is still the equations'."""
    shapes = [(600, 300), (150_000,), (3, 4), (5,)]
    assert min(math.prod(s) * 8 for s in shapes[:2]) > CUT_ABOVE
    thetas, grad_seq = _problem(5, shapes=shapes)
    expected = reference_diffgrad(thetas, grad_seq, lr=1e-2, wd=0.05)
    got, _ = _run(lambda ps: DiffGrad(ps, lr=1e-2, weight_decay=0.05,
                                      foreach=path == "foreach"), thetas, grad_seq)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_loop_and_foreach_are_bitwise_identical():
    thetas, grad_seq = _problem(20, torch.float32)
    a, _ = _run(lambda ps: DiffGrad(ps, lr=1e-2, weight_decay=0.1, foreach=False),
                thetas, grad_seq)
    b, _ = _run(lambda ps: DiffGrad(ps, lr=1e-2, weight_decay=0.1, foreach=True),
                thetas, grad_seq)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def _assert_fused_float32_matches_reference(shapes, steps):
    """Fused DiffGrad in float32 vs the float64 reference; returns the optimizer."""
    thetas, grad_seq = _problem(steps, torch.float32, shapes)
    expected = reference_diffgrad([t.double() for t in thetas],
                                  [[g.double() for g in gs] for gs in grad_seq],
                                  lr=1e-2, wd=0.01)
    got, opt = _run(lambda ps: DiffGrad(ps, lr=1e-2, weight_decay=0.01, fused=True),
                    thetas, grad_seq)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    return opt


def test_fused_matches_reference_and_lr_changes_do_not_recompile():
    """Fused path (big tensor alone, small ones packed) vs the reference, then a StepLR
    schedule and new tensor sizes re-use the compiled kernel."""
    opt = _assert_fused_float32_matches_reference([(200, 200), *SHAPES], 8)
    assert_schedule_does_not_recompile(opt)
    compiles = _fused.compile_count()
    other = [torch.nn.Parameter(torch.randn(s)) for s in [(300, 150), (7, 5)]]
    other_opt = DiffGrad(other, lr=1e-3, fused=True)
    for p in other:
        p.grad = torch.randn_like(p)
    other_opt.step()
    assert _fused.compile_count() == compiles


def test_fused_chunked_big_tensors_match_reference():
    """More big tensors than ``_fused.CHUNK``: several run in one compiled call (different
    sizes in one chunk), the remainder one call each; all match the reference."""
    shapes = [(200, 200), (300, 150), (200, 200), (180, 190), (200, 200), (5,)]
    assert sum(math.prod(s) >= BIG_NUMEL for s in shapes) > _fused.CHUNK
    _assert_fused_float32_matches_reference(shapes, 4)


@pytest.mark.slow
@pytest.mark.parametrize(("wd", "maximize", "legacy"), [(0.0, False, False), (0.05, True, True)])
def test_fused_float64_parity_with_reference_over_100_steps(wd, maximize, legacy):
    thetas, grad_seq = _problem(100, shapes=[(200, 200), *SHAPES])
    expected = reference_diffgrad(thetas, grad_seq, lr=1e-2, wd=wd, maximize=maximize,
                                  legacy=legacy)
    got, _ = _run(lambda ps: DiffGrad(ps, lr=1e-2, weight_decay=wd, maximize=maximize,
                                      legacy_alias_bug=legacy, fused=True), thetas, grad_seq)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_matches_torch_optimizer_diffgrad():
    """torch_optimizer.DiffGrad implements the same v2 rule (it adds decay into p.grad)."""
    torch_optimizer = pytest.importorskip("torch_optimizer")
    thetas, grad_seq = _problem(30)
    ours, _ = _run(lambda ps: DiffGrad(ps, lr=1e-2, weight_decay=0.01), thetas, grad_seq)
    theirs, _ = _run(lambda ps: torch_optimizer.DiffGrad(ps, lr=1e-2, weight_decay=0.01),
                     thetas, grad_seq)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
