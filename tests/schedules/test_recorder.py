"""GradNormRecorder: correct global norms, read-only, hook timing, persistence, and feeding
refine_schedule."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradkit.schedules import GradNormRecorder, refine_schedule


def _model():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _backward(model, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, generator=gen)
    model.zero_grad()
    model(x).square().mean().backward()


def test_records_global_l2_and_l1_without_modifying_anything():
    model = _model()
    rec = GradNormRecorder(model)
    for seed in range(3):
        _backward(model, seed)
        grads = [p.grad.clone() for p in model.parameters()]
        params = [p.detach().clone() for p in model.parameters()]
        rec.record()
        flat = torch.cat([g.reshape(-1) for g in grads]).double()
        assert rec.l2[-1] == pytest.approx(float(flat.norm()), rel=1e-6)
        assert rec.l1[-1] == pytest.approx(float(flat.abs().sum()), rel=1e-6)
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert len(rec) == 3


def test_attach_records_before_each_step_and_can_be_removed():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = GradNormRecorder()
    handle = rec.attach(opt)
    expected = []
    for seed in range(4):
        _backward(model, seed)
        expected.append(float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()))
        opt.step()
    assert rec.l2 == pytest.approx(expected, rel=1e-6)
    handle.remove()
    _backward(model, 9)
    opt.step()
    assert len(rec) == 4


def test_no_gradient_is_nan_and_sparse_refused():
    p = nn.Parameter(torch.zeros(3))
    rec = GradNormRecorder([p])
    rec()
    assert math.isnan(rec.l2[0]) and math.isnan(rec.l1[0])
    emb = nn.Embedding(5, 2, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        GradNormRecorder(emb).record()
    with pytest.raises(RuntimeError, match="watches no parameters"):
        GradNormRecorder().record()


@pytest.mark.parametrize("suffix", [".json", ".npy"])
def test_save_load_round_trip_and_refine(tmp_path, suffix):
    model = _model()
    rec = GradNormRecorder(model)
    for seed in range(6):
        _backward(model, seed)
        rec.record()
    rec.record()  # unchanged grads: a repeated value is fine
    path = tmp_path / f"norms{suffix}"
    rec.save(path)
    back = GradNormRecorder.load(path)
    assert back.l2 == rec.l2 and back.l1 == rec.l1
    for norm in ("l2", "l1"):
        assert refine_schedule(back, norm=norm, tau=0) == refine_schedule(
            np.array(getattr(rec, norm)), norm=norm, tau=0)
    with pytest.raises(ValueError, match="unsupported file type"):
        rec.save(tmp_path / "norms.csv")
