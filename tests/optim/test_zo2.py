"""ZO2's block-wise schedule against MeZO: bit-for-bit after flush, one update behind
without it, resume with the pending update, bad input."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from gradkit.optim import ZO2, MeZO

F64 = torch.float64


def _blocks() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.Tanh()),
                         nn.Sequential(nn.Linear(8, 8), nn.Tanh()),
                         nn.Linear(8, 3)).to(F64)


def _data():
    torch.manual_seed(1)
    return torch.randn(10, 4, dtype=F64), torch.randn(10, 3, dtype=F64)


def _mezo_run(model, x, y, steps, **kw):
    opt = MeZO(model.parameters(), check_determinism=False, **kw)
    return [opt.step(lambda: nn.functional.mse_loss(model(x), y)) for _ in range(steps)]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_k_steps_and_flush_equal_k_mezo_steps_bitwise(weight_decay):
    x, y = _data()
    ref, model = _blocks(), _blocks()
    hyper = dict(lr=0.05, eps=1e-3, weight_decay=weight_decay, seed=4)
    ref_losses = _mezo_run(ref, x, y, 6, **hyper)
    zo2 = ZO2(list(model), **hyper)
    losses = [zo2.step(x, lambda h: nn.functional.mse_loss(h, y)) for _ in range(6)]
    assert losses == ref_losses
    zo2.flush()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_without_flush_the_last_update_is_pending():
    x, y = _data()
    ref, model = _blocks(), _blocks()
    _mezo_run(ref, x, y, 4, lr=0.05, seed=2)
    zo2 = ZO2(list(model), lr=0.05, seed=2)
    for _ in range(5):
        zo2.step(x, lambda h: nn.functional.mse_loss(h, y))
    assert zo2.pending is not None
    # after 5 steps without flush: 4 updates applied (step 5's ±ε sweeps round slightly)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    zo2.flush()
    assert zo2.pending is None
    ref5 = _blocks()
    _mezo_run(ref5, x, y, 5, lr=0.05, seed=2)
    for a, b in zip(model.parameters(), ref5.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(model[2].weight, ref[2].weight)


def test_an_error_mid_step_leaves_the_previous_update_applied_and_no_perturbation():
    x, y = _data()
    ref, model = _blocks(), _blocks()
    _mezo_run(ref, x, y, 2, lr=0.05, seed=5)
    zo2 = ZO2(list(model), lr=0.05, seed=5)
    for _ in range(2):
        zo2.step(x, lambda h: nn.functional.mse_loss(h, y))

    calls = []

    def failing(h):
        calls.append(1)
        raise KeyboardInterrupt

    original = model[1].forward
    model[1].forward = lambda h: failing(h) if len(calls) < 1 else original(h)
    with pytest.raises(KeyboardInterrupt):
        zo2.step(x, lambda h: nn.functional.mse_loss(h, y))
    assert zo2.pending is None and zo2.step_count == 2
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_resume_with_the_pending_update_is_bitwise():
    x, y = _data()

    def loss(h):
        return nn.functional.mse_loss(h, y)

    ref = _blocks()
    zo_ref = ZO2(list(ref), lr=0.05, seed=3)
    for _ in range(6):
        zo_ref.step(x, loss)
    zo_ref.flush()
    model = _blocks()
    zo = ZO2(list(model), lr=0.05, seed=3)
    for _ in range(3):
        zo.step(x, loss)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "zo2": zo.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = _blocks()
    fresh.load_state_dict(saved["model"])
    zo_fresh = ZO2(list(fresh), lr=0.05, seed=99)
    zo_fresh.load_state_dict(saved["zo2"])
    for _ in range(3):
        zo_fresh.step(x, loss)
    zo_fresh.flush()
    for a, b in zip(fresh.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_non_finite_estimate_is_dropped():
    model = _blocks()
    before = copy.deepcopy(model)
    zo = ZO2(list(model), lr=0.05, seed=0)
    zo.step(torch.zeros(2, 4, dtype=F64), lambda h: torch.tensor(float("nan")))
    assert zo.pending == 0.0
    zo.flush()
    for a, b in zip(model.parameters(), before.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (dict(eps=0.0), "Invalid eps value: 0.0"),
    (dict(weight_decay=-1.0), "Invalid weight_decay value: -1.0"),
])
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ZO2(list(_blocks()), **kwargs)


def test_closure_must_return_a_loss():
    zo = ZO2(list(_blocks()))
    with pytest.raises(TypeError, match="returns the loss"):
        zo.step(torch.zeros(2, 4, dtype=F64), lambda h: None)
