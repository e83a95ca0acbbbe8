"""M3 / RM3 / RA3 and winsorized GD: spec KATs, buffer schedule, float64 parity, numpy oracle."""

import numpy as np
import pytest
import torch
from torch import nn

from gradkit.optim import M3, RA3, RM3, create, winsorized_gradient, winsorized_grads
from gradkit.optim.coherent import median_of_three
from tests.optim.roundtrip import assert_bitwise_resume


@pytest.mark.parametrize("foreach", [False, True])
def test_median_known_answers(foreach):
    one = median_of_three([torch.tensor([1.0])], [torch.tensor([5.0])], [torch.tensor([3.0])],
                          foreach=foreach)
    assert one[0].tolist() == [3.0]
    two = median_of_three([torch.tensor([1.0, 9.0])], [torch.tensor([2.0, 0.0])],
                          [torch.tensor([3.0, 4.0])], foreach=foreach)
    assert two[0].tolist() == [2.0, 4.0]


def run_schedule(cls, n_steps, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    p = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = cls([p], lr=1.0, **kwargs)
    grads, deltas = [], []
    for _ in range(n_steps):
        g = torch.randn(5, dtype=torch.float64, generator=gen)
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        grads.append(g)
        deltas.append(before - p.detach())
    return grads, deltas


def middle(*hs):
    return torch.stack(hs).median(dim=0).values


def test_rm3_updates_from_step_3_with_the_last_three():
    g, d = run_schedule(RM3, 6)
    assert torch.equal(d[0], torch.zeros(5)) and torch.equal(d[1], torch.zeros(5))
    torch.testing.assert_close(d[2], middle(g[0], g[1], g[2]), rtol=0, atol=1e-15)
    torch.testing.assert_close(d[3], middle(g[3], g[1], g[2]), rtol=0, atol=1e-15)
    torch.testing.assert_close(d[5], middle(g[3], g[4], g[5]), rtol=0, atol=1e-15)


def test_m3_and_ra3_update_every_third_step_on_disjoint_triples():
    g, d = run_schedule(M3, 6)
    g2, d2 = run_schedule(RA3, 6)
    for k in (0, 1, 3, 4):
        assert torch.equal(d[k], torch.zeros(5)) and torch.equal(d2[k], torch.zeros(5))
    torch.testing.assert_close(d[2], middle(*g[0:3]), rtol=0, atol=1e-15)
    torch.testing.assert_close(d[5], middle(*g[3:6]), rtol=0, atol=1e-15)
    torch.testing.assert_close(d2[2], sum(g2[0:3]) / 3, rtol=0, atol=1e-15)
    torch.testing.assert_close(d2[5], sum(g2[3:6]) / 3, rtol=0, atol=1e-15)


@pytest.mark.parametrize("cls, running", [(RM3, True), (M3, False)])
@pytest.mark.parametrize("foreach, maximize", [(False, False), (True, True)])
def test_float64_parity_with_l2_decay_before_buffering(cls, running, foreach, maximize):
    gen = torch.Generator().manual_seed(1)
    shapes = [(3, 2), (4,)]
    params = [nn.Parameter(torch.randn(*s, dtype=torch.float64, generator=gen)) for s in shapes]
    ref = [p.detach().clone() for p in params]
    history = [[] for _ in shapes]
    lr, wd = 0.1, 0.05
    opt = cls(params, lr=lr, weight_decay=wd, maximize=maximize, foreach=foreach)
    for t in range(1, 31):
        grads = [torch.randn(*s, dtype=torch.float64, generator=gen) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            history[i].append((-g if maximize else g) + wd * ref[i])  # h_t uses θ_{t-1}
            if t >= 3 and (running or t % 3 == 0):
                ref[i] = ref[i] - lr * middle(*history[i][-3:])
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-12)


def test_state_dict_round_trip_mid_triple_and_validation():
    torch.manual_seed(0)
    x, y = torch.randn(32, 3), torch.randn(32, 1)

    def run(model, opt, start, n):  # a different mini-batch at each step
        for k in range(start, start + n):
            opt.zero_grad()
            xb, yb = x[k % 4 * 8:(k % 4 + 1) * 8], y[k % 4 * 8:(k % 4 + 1) * 8]
            nn.functional.mse_loss(model(xb), yb).backward()
            opt.step()

    # 50 = 3·16 + 2: the saved buffer holds two gradients of an unfinished triple
    model, _, _ = assert_bitwise_resume(lambda: nn.Linear(3, 1),
                                        lambda m: create("m3", m.parameters(), lr=0.1), run)
    with pytest.raises(ValueError, match="required optimization parameter lr"):
        RM3(model.parameters())  # lr is required: top-level or in every group (as torch)
    with pytest.raises(ValueError, match="learning rate"):
        RM3([{"params": model.parameters(), "lr": -1.0}])
    with pytest.raises(ValueError, match="weight_decay"):
        RM3(model.parameters(), lr=0.1, weight_decay=-1)
    model.weight.grad = torch.zeros(1, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        create("rm3", model.parameters(), lr=0.1).step()


def test_grad_none_closure_and_scheduler():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = RM3([a, b], lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    grad_mode = []

    def closure():
        grad_mode.append(torch.is_grad_enabled())
        loss = (a * torch.tensor([1.0, -2.0])).sum()
        loss.backward()
        return loss

    for _ in range(3):
        opt.zero_grad()
        assert opt.step(closure).item() == 0.0  # the loss is returned (evaluated at a = 0)
        sched.step()
    assert grad_mode == [True] * 3 and b not in opt.state
    assert torch.equal(b.detach(), torch.zeros(2))
    torch.testing.assert_close(a.detach(), torch.tensor([-0.25, 0.5]))  # lr 1·0.5² at step 3


# ----------------------------------------------------------------------- winsorization
def test_winsorized_known_answer():
    values = torch.tensor([0.0, 1, 2, 3, 4, 5, 6, 7, 8, 100]).reshape(10, 1)
    assert winsorized_gradient(values, 10.0).item() == 45.0
    assert winsorized_gradient(values, 0.0).item() == 136.0
    with pytest.raises(ValueError, match="c value"):
        winsorized_gradient(values, 60.0)


@pytest.mark.parametrize("m, c", [(10, 10.0), (7, 25.0), (9, 12.5), (5, 50.0), (20, 5.0),
                                  (5, 12.5), (3, 25.0)])  # last two: q(m−1) ties at .5
def test_winsorized_matches_numpy_nearest_percentiles(m, c):
    gen = torch.Generator().manual_seed(m)
    g = torch.randint(-5, 6, (m, 3, 4), generator=gen).double()  # ties included
    arr = g.numpy()
    lo = np.percentile(arr, c, axis=0, method="nearest")
    hi = np.percentile(arr, 100 - c, axis=0, method="nearest")
    expected = np.clip(arr, lo, hi).sum(0)
    np.testing.assert_array_equal(winsorized_gradient(g, c).numpy(), expected)


def test_winsorized_grads_sets_p_grad_and_c0_is_the_mean_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(12, 3), torch.randn(12, 2)
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    out = winsorized_grads(model, nn.functional.mse_loss, x, y, c=0.0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(out[n], full[n], rtol=1e-5, atol=1e-6)
        assert torch.equal(p.grad, out[n])
    clipped = winsorized_grads(model, nn.functional.mse_loss, x, y, c=25.0, set_grad=False)
    assert any(not torch.allclose(clipped[n], full[n]) for n in full)
    assert all(torch.equal(p.grad, out[n]) for n, p in model.named_parameters())
