"""⊥Grad wrapper: spec KAT, float64 parity, p.grad untouched, live inner groups and state."""

import copy
import math

import pytest
import torch
from torch import nn

from gradkit.optim import PerpGrad, create
from gradkit.optim.perpgrad import orthogonal_gradients
from tests.optim.roundtrip import assert_bitwise_resume, mse_run


def ref_perp(w, g):
    w, g = w.reshape(-1), g.reshape(-1)
    perp = g - (w @ g) / (w @ w + 1e-30) * w
    return (perp * g.norm() / (perp.norm() + 1e-30)).reshape(-1)


@pytest.mark.parametrize("foreach", [False, True])
def test_spec_known_answer(foreach):
    w = torch.tensor([1.0, 0.0], dtype=torch.float64)
    g = torch.tensor([1.0, 1.0], dtype=torch.float64)
    (out,) = orthogonal_gradients([w], [g], foreach=foreach)
    torch.testing.assert_close(out, torch.tensor([0.0, math.sqrt(2.0)], dtype=torch.float64))
    assert torch.dot(w, out).item() == 0.0
    assert out.norm().item() == pytest.approx(g.norm().item(), rel=1e-15)
    zero = torch.zeros(2, dtype=torch.float64)  # w = 0: g unchanged
    torch.testing.assert_close(orthogonal_gradients([zero], [g], foreach=foreach)[0], g)


def test_step_uses_projection_and_leaves_p_grad_alone():
    w = nn.Parameter(torch.tensor([1.0, 0.0], dtype=torch.float64))
    grad = torch.tensor([1.0, 1.0], dtype=torch.float64)
    w.grad = grad
    opt = PerpGrad([w], base="sgd", lr=1.0)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, -math.sqrt(2.0)],
                                                         dtype=torch.float64))
    assert w.grad is grad and torch.equal(grad, torch.tensor([1.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("foreach", [False, True])
def test_float64_parity_with_sgd_momentum(foreach):
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (3,), (2, 2, 3)]
    params = [nn.Parameter(torch.randn(*s, dtype=torch.float64, generator=gen)) for s in shapes]
    ref = [p.detach().clone() for p in params]
    bufs = [None] * len(params)
    lr, mom, wd = 0.05, 0.8, 0.01
    opt = create("perpgrad", params, base="sgd", lr=lr, momentum=mom, weight_decay=wd,
                 foreach=foreach, perp_foreach=foreach)
    assert opt.base.defaults["foreach"] is foreach and opt.defaults["perp_foreach"] is foreach
    for _ in range(30):
        grads = [torch.randn(*s, dtype=torch.float64, generator=gen) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, (x, g) in enumerate(zip(ref, grads)):
            d = ref_perp(x, g).reshape(x.shape) + wd * x  # SGD's own L2 decay after ⊥
            bufs[i] = d if bufs[i] is None else mom * bufs[i] + d
            ref[i] = x - lr * bufs[i]
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-12)


def test_wraps_an_instance_live_groups_state_scheduler_and_round_trip():
    torch.manual_seed(0)
    run = mse_run(torch.randn(16, 3), torch.randn(16, 1))

    def build_model():
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))

    def build_opt(model):
        opt = PerpGrad(base=torch.optim.AdamW(model.parameters(), lr=1e-2))
        assert isinstance(opt, torch.optim.Optimizer)
        assert opt.param_groups is opt.base.param_groups and opt.state is opt.base.state
        return opt

    fresh, fresh_opt, _ = assert_bitwise_resume(
        build_model, build_opt, run,
        build_fresh_opt=lambda m: PerpGrad(m.parameters(), base="adamw", lr=1.0))
    assert fresh_opt.param_groups is fresh_opt.base.param_groups  # re-linked after loading
    assert fresh_opt.state is fresh_opt.base.state
    assert fresh_opt.base.param_groups[0]["lr"] == 1e-2

    sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=1, gamma=0.1)
    run(fresh, fresh_opt, 0, 1)
    sched.step()
    assert fresh_opt.base.param_groups[0]["lr"] == pytest.approx(1e-3)
    extra = nn.Parameter(torch.zeros(2))
    fresh_opt.add_param_group({"params": [extra]})
    assert fresh_opt.base.param_groups[-1]["params"] == [extra]
    assert "perp_foreach" in fresh_opt.base.param_groups[-1]
    clone = copy.deepcopy(fresh_opt)
    assert clone.param_groups is clone.base.param_groups and clone.state is clone.base.state
    assert "AdamW" in repr(fresh_opt)


def test_closure_and_hooks():
    w = nn.Parameter(torch.tensor([1.0, 0.0], dtype=torch.float64))
    opt = PerpGrad([w], base="sgd", lr=1.0)
    fired = []
    opt.register_step_post_hook(lambda *_: fired.append("post"))

    def closure():
        loss = (w * torch.tensor([1.0, 1.0], dtype=torch.float64)).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 1.0 and fired == ["post"]
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, -math.sqrt(2.0)],
                                                         dtype=torch.float64))


def test_errors():
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="base"):
        PerpGrad(p, base=42)
    with pytest.raises(ValueError, match="existing optimizer"):
        PerpGrad(base=torch.optim.SGD(p, lr=0.1), lr=0.2)
    with pytest.raises(ValueError, match="learning rate"):
        PerpGrad(p, base="sgd", lr=-1.0)
    opt = PerpGrad(p, base="sgd", lr=0.1)
    p[0].grad = torch.eye(2)[0].to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    p[0].grad = None
    opt.step()  # grad None: skipped
    assert torch.equal(p[0].detach(), torch.zeros(2))


@pytest.mark.parametrize("foreach", [False, True])
def test_stays_finite_where_sgd_does(foreach):
    """float16 zero gradient (a 1e-30 guard underflows to 0 in float16) and float32
    gradients of 1e19 and more (their squared norm overflows): finite, and the direction of
    the float64 computation."""
    w16 = nn.Parameter(torch.arange(6, dtype=torch.float16))
    w16.grad = torch.zeros(6, dtype=torch.float16)
    PerpGrad([w16], base="sgd", lr=0.1, perp_foreach=foreach).step()
    assert torch.equal(w16.detach(), torch.arange(6, dtype=torch.float16))
    for scale in (1e19, 1e30):
        w = torch.linspace(-1.0, 2.0, 6)
        g = torch.linspace(0.5, 3.0, 6) * scale
        (got,) = orthogonal_gradients([w], [g], foreach=foreach)
        want = ref_perp(w.double(), g.double()).float()
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0.0)
        p = nn.Parameter(w.clone())
        p.grad = g
        PerpGrad([p], base="sgd", lr=1e-30, perp_foreach=foreach).step()
        assert torch.isfinite(p).all()
    half = orthogonal_gradients([torch.ones(4, dtype=torch.float16)],
                                [torch.tensor([1.0, -1.0, 2.0, 0.0], dtype=torch.float16)],
                                foreach=foreach)[0]
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), ref_perp(torch.ones(4, dtype=torch.float64),
                               torch.tensor([1.0, -1.0, 2.0, 0.0], dtype=torch.float64)).float(),
                               rtol=1e-3, atol=1e-3)
