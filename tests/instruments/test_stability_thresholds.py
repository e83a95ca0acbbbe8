"""KAT 16: edge-of-stability divergence thresholds on quadratics, checked by simulating the
dynamics just above and just below each threshold."""

import pytest
import torch

from gradkit.instruments import (
    adam_preconditioner_sqrt_inv,
    adam_threshold,
    gd_threshold,
    heavy_ball_threshold,
    stability_threshold,
)


def _torch_sgd_diverges(curv: float, steps: int = 1000, **sgd_kwargs) -> bool:
    """Run torch's own SGD on ½·curv·x² and report divergence."""
    x = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([x], **sgd_kwargs)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * curv * x**2).sum().backward()
        opt.step()
    return abs(float(x.detach())) > 1.0


@pytest.mark.parametrize("kwargs, kind", [
    ({"lr": 0.1}, "gd"),
    ({"lr": 0.05, "momentum": 0.9}, "heavy_ball"),
    ({"lr": 0.05, "momentum": 0.5, "nesterov": True}, "nesterov"),
    ({"lr": 0.05, "momentum": 0.8, "dampening": 0.3}, "heavy_ball"),
    ({"lr": 0.1, "weight_decay": 0.5}, "gd"),
    ({"lr": 0.02, "momentum": 0.9, "weight_decay": 1.0}, "heavy_ball"),
])
def test_sgd_family_thresholds_separate_divergence(kwargs, kind):
    x = torch.zeros(1, requires_grad=True)
    thr = stability_threshold(torch.optim.SGD([x], **kwargs))
    assert thr.kind == kind and thr.lr == kwargs["lr"]
    assert not _torch_sgd_diverges(0.98 * thr.value, **kwargs)
    assert _torch_sgd_diverges(1.02 * thr.value, **kwargs)


def test_threshold_closed_forms():
    assert gd_threshold(0.1) == pytest.approx(20.0)
    assert heavy_ball_threshold(0.1, 0.9) == pytest.approx(38.0)
    assert heavy_ball_threshold(0.1, 0.5, nesterov=True) == pytest.approx(15.0)
    assert adam_threshold(1.0, 0.9) == pytest.approx(38.0)
    with pytest.raises(ValueError, match="learning rate"):
        gd_threshold(0.0)
    with pytest.raises(ValueError, match="momentum"):
        heavy_ball_threshold(0.1, 1.0)


def _frozen_adam_diverges(h, p_diag, lr, beta1, steps=2000):
    """Adam's momentum with a frozen diagonal preconditioner P on ½xᵀHx (float64)."""
    x = torch.ones(h.shape[0], dtype=torch.float64)
    m = torch.zeros_like(x)
    for _ in range(steps):
        m = beta1 * m + (1 - beta1) * (h @ x)
        x = x - lr * m / p_diag
    return not float(x.norm()) < 1.0  # inf/nan count as diverged


@pytest.mark.parametrize("beta1", [0.9, 0.5])
def test_frozen_preconditioner_adam_threshold(beta1):
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    h0 = q @ torch.diag(torch.tensor([1.0, 0.5, 0.2, 0.1, 0.05], dtype=torch.float64)) @ q.T
    p_diag = torch.rand(5, generator=gen, dtype=torch.float64) + 0.1
    d = p_diag.rsqrt()
    lam = float(torch.linalg.eigvalsh(d[:, None] * h0 * d[None, :]).max())
    lr = 0.01
    thr = adam_threshold(lr, beta1)
    if beta1 == 0.9:
        assert thr == pytest.approx(38 / lr)
    assert not _frozen_adam_diverges(h0 * (0.98 * thr / lam), p_diag, lr, beta1)
    assert _frozen_adam_diverges(h0 * (1.02 * thr / lam), p_diag, lr, beta1)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_preconditioner_read_from_state(amsgrad):
    w = torch.randn(3, 2, requires_grad=True)
    b = torch.randn(2, requires_grad=True)
    opt = torch.optim.AdamW([w, b], lr=0.01, betas=(0.8, 0.95), eps=1e-3, amsgrad=amsgrad)
    with pytest.raises(ValueError, match=r"after the first optimizer\.step"):
        adam_preconditioner_sqrt_inv(opt, [w, b])
    for _ in range(3):
        opt.zero_grad()
        ((w**3).sum() + (b**2).sum()).backward()
        opt.step()
    thr = stability_threshold(opt)
    assert thr.kind == "adam" and thr.value == pytest.approx(3.6 / (0.2 * 0.01))
    want = []
    for p in (w, b):
        st = opt.state[p]
        v = st["max_exp_avg_sq"] if amsgrad else st["exp_avg_sq"]
        v_hat = v / (1 - 0.95 ** float(st["step"]))
        want.append((1.0 / torch.sqrt(torch.sqrt(v_hat) + 1e-3)).reshape(-1))
    torch.testing.assert_close(adam_preconditioner_sqrt_inv(opt, [w, b]), torch.cat(want))


def test_threshold_refuses_disagreeing_groups_and_unknown_optimizers():
    a, b = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2}])
    with pytest.raises(ValueError, match="param groups disagree"):
        stability_threshold(opt)
    assert stability_threshold(torch.optim.Adagrad([a])) is None
