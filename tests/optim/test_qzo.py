"""QZO: int8 quantisation of linear layers, clipping of the SPSA estimate, fine-tuning only
the scales."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradkit.optim import QZO, MeZO, QuantizedLinear, create, quantize_int8
from gradkit.optim.mezo import perturbation_seeds

F64 = torch.float64


def test_quantize_int8_reconstructs_the_weights_to_half_a_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Sequential(nn.Linear(5, 2)))
    weights = [model[0].weight.detach().clone(), model[2][0].weight.detach().clone()]
    quantize_int8(model)
    layers = [model[0], model[2][0]]
    assert all(isinstance(layer, QuantizedLinear) for layer in layers)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.scale",
                                                                         "2.0.scale"]
    for layer, w in zip(layers, weights):
        assert layer.codes.dtype == torch.int8 and layer.codes.abs().max() <= 127
        err = (layer.weight() - w).abs()
        assert (err <= layer.scale[:, None] / 2 + 1e-7).all()


def test_clipped_step_is_exactly_lr_c_sign_d_z():
    """|d| > C: the applied step is γ·C·sign(d)·z."""
    a = torch.tensor([30.0, -40.0, 10.0], dtype=F64)
    for sign in (1.0, -1.0):
        scale = nn.Parameter(torch.zeros(3, dtype=F64))
        opt = QZO([scale], lr=0.1, eps=1e-3, clip=0.5, seed=1)
        opt.step(lambda sign=sign, scale=scale: sign * a @ scale)
        gen = torch.Generator().manual_seed(perturbation_seeds(1, 1, 1)[0])
        z = torch.randn(3, generator=gen, dtype=F64)
        d = (sign * a @ z).item()
        assert abs(d) > 0.5
        expected = -0.1 * 0.5 * (1.0 if d > 0 else -1.0) * z
        torch.testing.assert_close(scale.detach(), expected, rtol=0, atol=1e-15)


def test_unclipped_qzo_is_mezo():
    torch.manual_seed(2)
    a = nn.Parameter(torch.randn(4, dtype=F64))
    b = nn.Parameter(a.detach().clone())
    QZO([a], lr=0.1, clip=1e6, seed=3).step(lambda: (a ** 2).sum())
    MeZO([b], lr=0.1, seed=3).step(lambda: (b ** 2).sum())
    assert torch.equal(a, b)


def test_fine_tuning_the_scales_lowers_the_loss():
    torch.manual_seed(4)
    x = torch.randn(128, 8)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    y = teacher(x).detach()
    student = quantize_int8(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)))
    with torch.no_grad():  # the student starts from the teacher with scales doubled
        for s_layer, t_layer in ((student[0], teacher[0]), (student[2], teacher[2])):
            q = QuantizedLinear(t_layer)
            s_layer.codes.copy_(q.codes)
            s_layer.bias.copy_(q.bias)
            s_layer.scale.copy_(q.scale * 2.0)
    opt = create("qzo", student.parameters(), lr=1e-5, eps=1e-4, clip=100.0, seed=0)
    losses = [opt.step(lambda: nn.functional.mse_loss(student(x), y)) for _ in range(200)]
    assert sum(losses[-10:]) / 10 < 0.1 * losses[0]


def test_clip_must_be_positive():
    with pytest.raises(ValueError, match="Invalid clip value: 0"):
        QZO([nn.Parameter(torch.zeros(2))], clip=0.0)
