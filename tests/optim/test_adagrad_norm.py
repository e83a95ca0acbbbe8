"""AdaGrad-Norm: spec KAT, float64 parity with the scalar recursion, per-group accumulators."""

import pytest
import torch
from torch import nn

from gradkit.optim import AdaGradNorm, create


def test_spec_known_answer():
    x = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    x.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
    opt = AdaGradNorm([x], lr=1.0)
    opt.step()
    torch.testing.assert_close(x.detach(), torch.tensor([0.4, 1.2], dtype=torch.float64))
    assert opt.state[x]["sum"].item() == 25.0  # b_1² = 0 + ||g||²


def test_zero_gradient_with_zero_accumulator_is_a_no_op():
    x = nn.Parameter(torch.ones(3))
    x.grad = torch.zeros(3)
    AdaGradNorm([x], lr=1.0).step()
    assert torch.equal(x.detach(), torch.ones(3))


@pytest.mark.parametrize("foreach, maximize", [(False, False), (True, True)])
def test_float64_parity_global_norm(foreach, maximize):
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    params = [nn.Parameter(torch.randn(*s, dtype=torch.float64, generator=gen)) for s in shapes]
    ref = [p.detach().clone() for p in params]
    lr, b2, wd = 0.3, 0.5, 0.01
    opt = AdaGradNorm(params, lr=lr, initial_accumulator_value=b2, weight_decay=wd,
                      maximize=maximize, foreach=foreach)
    sign = -1.0 if maximize else 1.0
    for _ in range(40):
        grads = [torch.randn(*s, dtype=torch.float64, generator=gen) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        eff = [sign * g + wd * x for g, x in zip(grads, ref)]
        b2 += sum(float((e * e).sum()) for e in eff)  # one scalar over all tensors
        ref = [x - lr * e / (b2**0.5 + 1e-10) for x, e in zip(ref, eff)]
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-12)


def test_accumulator_is_per_group_and_grad_none_is_skipped():
    a = nn.Parameter(torch.zeros(2))
    b = nn.Parameter(torch.zeros(2))
    c = nn.Parameter(torch.zeros(2))
    opt = AdaGradNorm([{"params": [a, c]}, {"params": [b]}], lr=1.0)
    a.grad = torch.tensor([3.0, 4.0])
    b.grad = torch.tensor([0.0, 1.0])
    opt.step()  # c has no grad: untouched, contributes nothing
    torch.testing.assert_close(a.detach(), torch.tensor([-0.6, -0.8]))
    torch.testing.assert_close(b.detach(), torch.tensor([0.0, -1.0]))
    assert torch.equal(c.detach(), torch.zeros(2)) and c not in opt.state
    a.grad = None
    c.grad = torch.tensor([0.0, 3.0])
    opt.step()  # c joins later: it continues the group's b² = 25 (kept by a), 25 + 9 = 34
    assert opt.state[c]["sum"].item() == pytest.approx(34.0)
    torch.testing.assert_close(c.detach(), torch.tensor([0.0, -3.0 / 34**0.5]))
    assert opt.state[a]["sum"].item() == 25.0 and opt.state[a]["step"].item() == 1.0
    assert opt.state[c]["step"].item() == 1.0
    torch.testing.assert_close(a.detach(), torch.tensor([-0.6, -0.8]))  # skipped
    b.grad = torch.eye(2)[0].to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_validation_and_registry():
    p = [nn.Parameter(torch.zeros(2))]
    for kwargs, text in [({"lr": -1}, "learning rate"), ({"eps": -1}, "eps"),
                         ({"initial_accumulator_value": -1}, "initial_accumulator_value"),
                         ({"weight_decay": -1}, "weight_decay")]:
        with pytest.raises(ValueError, match=text):
            AdaGradNorm(p, **kwargs)
    assert isinstance(create("adagradnorm", p, lr=0.1), AdaGradNorm)
