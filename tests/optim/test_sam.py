"""SAM wrapper: parity with an independent reference on a quadratic, closure rules, wrapper."""

import pytest
import torch
from torch import nn

from gradkit.optim import SAM, create
from tests.optim.roundtrip import assert_bitwise_resume, mse_run


def quadratic(dim=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(dim, dim, dtype=torch.float64, generator=gen)
    A = M @ M.T + torch.eye(dim, dtype=torch.float64)
    b = torch.randn(dim, dtype=torch.float64, generator=gen)
    return A, b


@pytest.mark.parametrize("adaptive", [False, True])
def test_float64_parity_on_a_quadratic(adaptive):
    A, b = quadratic()
    w = nn.Parameter(torch.ones(4, dtype=torch.float64))
    calls = []

    def closure():  # no zero_grad here on purpose: SAM resets grads before each call
        calls.append(w.detach().clone())
        loss = 0.5 * w @ A @ w - b @ w
        loss.backward()
        return loss

    lr, mom, rho = 0.02, 0.9, 0.1
    opt = create("sam", [w], base="sgd", rho=rho, adaptive=adaptive, lr=lr, momentum=mom)
    x, buf = torch.ones(4, dtype=torch.float64), None
    for _ in range(25):
        loss = opt.step(closure)
        g = A @ x - b
        assert loss.item() == pytest.approx((0.5 * x @ A @ x - b @ x).item(), rel=1e-12)
        if adaptive:
            e = rho * x * x * g / ((x * g).norm() + 1e-12)
        else:
            e = rho * g / (g.norm() + 1e-12)
        g_sam = A @ (x + e) - b
        torch.testing.assert_close(calls[-1], x + e, rtol=0, atol=1e-13)
        torch.testing.assert_close(w.grad, g_sam, rtol=0, atol=1e-12)  # left at w + e
        buf = g_sam if buf is None else mom * buf + g_sam
        x = x - lr * buf
    assert len(calls) == 50
    torch.testing.assert_close(w.detach(), x, rtol=0, atol=1e-12)


def test_global_norm_across_groups_with_per_group_rho():
    a = nn.Parameter(torch.tensor([3.0], dtype=torch.float64))
    c = nn.Parameter(torch.tensor([4.0], dtype=torch.float64))
    seen = []

    def closure():
        seen.append((a.item(), c.item()))
        loss = 0.5 * (a * a).sum() + 0.5 * (c * c).sum()  # gradient = (a, c) = (3, 4)
        loss.backward()
        return loss

    opt = SAM([{"params": [a], "rho": 0.5}, {"params": [c]}], base="sgd", rho=1.0, lr=0.0)
    opt.step(closure)
    assert seen[1] == pytest.approx((3.0 + 0.5 * 3 / 5, 4.0 + 1.0 * 4 / 5), rel=1e-12)
    assert (a.item(), c.item()) == (3.0, 4.0)  # restored exactly (lr = 0)


def test_maximize_mirrors_minimizing_the_negated_loss():
    A, b = quadratic(seed=2)
    w1 = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    w2 = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt1 = SAM([w1], base="sgd", lr=0.05, maximize=True)
    opt2 = SAM([w2], base="sgd", lr=0.05)
    for _ in range(10):
        opt1.step(lambda: (-(0.5 * w1 @ A @ w1 - b @ w1)).backward())
        opt2.step(lambda: (0.5 * w2 @ A @ w2 - b @ w2).backward())
    assert torch.equal(w1, w2) and w1.abs().sum() > 0


def test_step_without_closure_raises_clearly():
    opt = SAM([nn.Parameter(torch.zeros(2))], base="sgd", lr=0.1)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="rho"):
        SAM([nn.Parameter(torch.zeros(2))], base="sgd", rho=-0.1, lr=0.1)


def test_manual_first_second_step_equals_closure_form():
    A, b = quadratic(seed=1)
    w1 = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    w2 = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt1 = SAM([w1], base="adam", lr=0.05, rho=0.05)
    opt2 = SAM([w2], base="adam", lr=0.05, rho=0.05)

    def loss_at(w):
        return 0.5 * w @ A @ w - b @ w

    for _ in range(10):
        opt1.step(lambda: loss_at(w1).backward())
        opt2.zero_grad()
        loss_at(w2).backward()
        opt2.first_step()
        opt2.zero_grad()
        loss_at(w2).backward()
        opt2.second_step()
    assert torch.equal(w1, w2)


def test_wrapper_state_dict_round_trip_and_scheduler():
    torch.manual_seed(0)
    run = mse_run(torch.randn(16, 3), torch.randn(16, 1), closure=True)

    def build_opt(model):
        opt = SAM(model.parameters(), base="sgd", lr=0.05, momentum=0.9)
        assert opt.param_groups is opt.base.param_groups and opt.state is opt.base.state
        return opt

    fresh, fresh_opt, saved = assert_bitwise_resume(
        lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)), build_opt, run,
        build_fresh_opt=lambda m: SAM(m.parameters(), base="sgd", lr=1.0, momentum=0.9))
    assert saved["param_groups"][0]["rho"] == 0.05
    sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=1, gamma=0.5)
    run(fresh, fresh_opt, 0, 1)
    sched.step()
    assert fresh_opt.base.param_groups[0]["lr"] == pytest.approx(0.025)


def test_reference_readme_loop_with_zero_grad_flags():
    """davda54/sam's README loop: backward, first_step(zero_grad=True), backward at w + e,
    second_step(zero_grad=True); equal to the closure form, gradients cleared after each."""
    A, b = quadratic(seed=3)
    w1 = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    w2 = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt1 = SAM([w1], torch.optim.SGD, lr=0.05, momentum=0.9)  # the reference's call form
    opt2 = SAM([w2], torch.optim.SGD, lr=0.05, momentum=0.9)

    def loss_at(w):
        return 0.5 * w @ A @ w - b @ w

    for _ in range(10):
        loss_at(w1).backward()
        opt1.first_step(zero_grad=True)
        assert w1.grad is None
        loss_at(w1).backward()
        opt1.second_step(zero_grad=True)
        assert w1.grad is None
        opt2.step(lambda: loss_at(w2).backward())
    assert torch.equal(w1, w2) and w1.abs().sum() > 0
