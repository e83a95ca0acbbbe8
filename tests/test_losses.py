"""StableMax / StableMax cross-entropy: KATs of methods.md §10 and instruments.md KAT 17,
gradcheck, and parity with an independent reference written from the paper's equations."""

import math

import pytest
import torch
from torch import nn

from gradkit.losses import (
    StableMax,
    StableMaxCrossEntropyLoss,
    log_stablemax,
    stablemax,
    stablemax_cross_entropy,
    stablemax_s,
)


# independent reference: the reference repository's formulas, written from the equations
def ref_s(x):
    return torch.where(x < 0, 1 / (1 - x + 1e-30), x + 1)


def ref_stablemax_ce(logits, target):
    z = logits.to(torch.float64)
    s = ref_s(z)
    logp = torch.log(s / s.sum(-1, keepdim=True))
    return -logp[torch.arange(z.shape[0]), target].mean()


def test_known_answer_2_0_minus1():
    x = torch.tensor([2.0, 0.0, -1.0], dtype=torch.float64)
    want = torch.tensor([2 / 3, 2 / 9, 1 / 9], dtype=torch.float64)
    torch.testing.assert_close(stablemax(x), want, rtol=0, atol=1e-15)
    loss = stablemax_cross_entropy(x[None], torch.tensor([0]))
    assert abs(loss.item() + math.log(2 / 3)) < 1e-15


def test_not_shift_invariant():
    def p(v):
        return stablemax(torch.tensor(v, dtype=torch.float64)).tolist()

    assert p([0.0, 0.0]) == pytest.approx([0.5, 0.5], abs=1e-15)
    assert p([1.0, 0.0]) == pytest.approx([2 / 3, 1 / 3], abs=1e-15)
    assert p([2.0, 1.0]) == pytest.approx([3 / 5, 2 / 5], abs=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_logits_do_not_saturate(dtype):
    p = stablemax(torch.tensor([1000.0, 0.0], dtype=dtype))
    torch.testing.assert_close(p, torch.tensor([1001 / 1002, 1 / 1002], dtype=dtype))
    assert p[0] < 1 and p[1] > 0
    softmax = torch.softmax(torch.tensor([1000.0, 0.0], dtype=dtype), 0)
    assert softmax[0] == 1  # what StableMax avoids


def test_s_values_and_sum_to_one():
    got = stablemax_s(torch.tensor([0.0, 1.0, -1.0, -3.0, 4.5], dtype=torch.float64))
    assert got.tolist() == [1.0, 2.0, 0.5, 0.25, 5.5]
    x = torch.randn(6, 7, 5, dtype=torch.float64) * 10
    for dim in (0, 1, -1):
        torch.testing.assert_close(stablemax(x, dim).sum(dim), torch.ones(()).double()
                                   .expand_as(x.sum(dim)))
        torch.testing.assert_close(log_stablemax(x, dim).exp(), stablemax(x, dim))
    assert (stablemax(x) > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_s_bitwise_equal_to_reference_with_1e30_guard(dtype):
    special = torch.tensor([0.0, 1.0, -1.0], dtype=dtype)
    x = torch.cat([torch.randn(1000, dtype=dtype) * 50, special])
    assert torch.equal(stablemax_s(x), ref_s(x))


def test_gradcheck_float64():
    x = (torch.randn(4, 5, dtype=torch.float64) * 3).requires_grad_()
    y = torch.randint(0, 5, (4,))
    assert torch.autograd.gradcheck(lambda z: stablemax(z, -1), (x,))
    assert torch.autograd.gradcheck(lambda z: log_stablemax(z, 0), (x,))
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda z, r=reduction: stablemax_cross_entropy(z, y, r), (x,))


def test_gradient_finite_in_float32_at_one_where_the_unguarded_where_gives_nan():
    x = torch.tensor([1.0, -1.0, 0.0], requires_grad=True)
    stablemax_s(x).sum().backward()
    assert x.grad.tolist() == [1.0, 0.25, 1.0]  # s'(x) = 1 for x >= 0, 1/(1-x)^2 below
    xr = torch.tensor([1.0], requires_grad=True)
    ref_s(xr).sum().backward()
    assert torch.isnan(xr.grad).all()  # the pitfall avoided by clamping the inactive branch


def test_loss_and_grad_match_reference_float64():
    logits = (torch.randn(16, 10, dtype=torch.float64) * 20).requires_grad_()
    target = torch.randint(0, 10, (16,))
    loss = stablemax_cross_entropy(logits, target)
    (g,) = torch.autograd.grad(loss, logits)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = ref_stablemax_ce(ref_logits, target)
    (rg,) = torch.autograd.grad(ref, ref_logits)
    torch.testing.assert_close(loss, ref, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(g, rg, rtol=1e-12, atol=1e-15)


def test_float32_logits_computed_in_float64_returned_in_float32():
    logits = torch.tensor([[1e8, 0.0]], requires_grad=True)
    loss = stablemax_cross_entropy(logits, torch.tensor([0]))
    assert loss.dtype == torch.float32
    # -log((1e8 + 1)/(1e8 + 2)) ≈ 1e-8: float64 resolves it, float32 rounds 1e8 + 1 to 1e8
    assert loss.item() == pytest.approx(1e-8, rel=1e-6)
    assert stablemax_cross_entropy(logits, torch.tensor([0]), dtype=None).item() == 0.0
    loss.backward()
    assert logits.grad.dtype == torch.float32 and torch.isfinite(logits.grad).all()


def test_reductions_and_class_dim_like_cross_entropy():
    logits = torch.randn(3, 4, 5, dtype=torch.float64)  # (N, C, d)
    target = torch.randint(0, 4, (3, 5))
    none = stablemax_cross_entropy(logits, target, "none")
    flat = logits.permute(0, 2, 1).reshape(-1, 4)
    per = torch.stack([ref_stablemax_ce(flat[i : i + 1], target.reshape(-1)[i : i + 1])
                       for i in range(15)])
    torch.testing.assert_close(none.reshape(-1), per)
    torch.testing.assert_close(stablemax_cross_entropy(logits, target, "sum"), per.sum())
    torch.testing.assert_close(stablemax_cross_entropy(logits, target), per.mean())
    single = stablemax_cross_entropy(logits[0, :, 0], target[0, 0])
    torch.testing.assert_close(single, per[0])


def test_modules():
    x = torch.randn(4, 3)
    torch.testing.assert_close(StableMax(dim=0)(x), stablemax(x, 0))
    assert "dim=0" in repr(StableMax(dim=0))
    y = torch.randint(0, 3, (4,))
    crit = StableMaxCrossEntropyLoss(reduction="sum")
    assert isinstance(crit, nn.Module)
    torch.testing.assert_close(crit(x, y), stablemax_cross_entropy(x, y, "sum"))


def test_errors():
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="reduction"):
        stablemax_cross_entropy(x, y, "avg")
    with pytest.raises(TypeError, match="class-index"):
        stablemax_cross_entropy(x, torch.rand(2, 3))
    with pytest.raises(ValueError, match="target shape"):
        stablemax_cross_entropy(x, torch.tensor([0, 1, 2]))
