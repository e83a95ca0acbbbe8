"""LinearDecayLR against an independent LambdaLR written from the formula; per-group lrs,
state_dict resume."""

import pytest
import torch
from torch import nn

from gradkit.schedules import LinearDecayLR


def _opt(lrs=(0.1, 0.03)):
    return torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs])


def _lrs(sched, steps):
    out = [sched.get_last_lr()]
    for _ in range(steps):
        sched.optimizer.step()
        sched.step()
        out.append(sched.get_last_lr())
    return out


def test_known_values_no_warmup():
    sched = LinearDecayLR(_opt([1.0]), total_steps=5)
    assert [lr[0] for lr in _lrs(sched, 6)] == pytest.approx([1, 0.75, 0.5, 0.25, 0, 0, 0])


def test_known_values_warmup_and_final_ratio():
    sched = LinearDecayLR(_opt([1.0]), total_steps=6, warmup_steps=2)
    assert [lr[0] for lr in _lrs(sched, 5)] == pytest.approx([1 / 3, 2 / 3, 1, 2 / 3, 1 / 3, 0])
    sched = LinearDecayLR(_opt([2.0]), total_steps=3, final_lr_ratio=0.1)
    assert [lr[0] for lr in _lrs(sched, 4)] == pytest.approx([2, 1.1, 0.2, 0.2, 0.2])


@pytest.mark.parametrize("warmup, ratio", [(0, 0.0), (7, 0.0), (3, 0.25)])
def test_matches_independent_lambda_per_group(warmup, ratio):
    total = 40

    def f(t):
        if t < warmup:
            return (t + 1) / (warmup + 1)
        return max(ratio, 1 - (1 - ratio) * (t - warmup) / (total - 1 - warmup))

    ours = LinearDecayLR(_opt(), total, warmup_steps=warmup, final_lr_ratio=ratio)
    ref = torch.optim.lr_scheduler.LambdaLR(_opt(), f)
    for a, b in zip(_lrs(ours, 45), _lrs(ref, 45)):
        assert a == pytest.approx(b, abs=1e-15)


def test_state_dict_resume_equals_uninterrupted():
    full = _lrs(LinearDecayLR(_opt(), 30, warmup_steps=4), 25)
    first = LinearDecayLR(_opt(), 30, warmup_steps=4)
    _lrs(first, 10)
    opt = _opt()
    resumed = LinearDecayLR(opt, 30, warmup_steps=4)
    resumed.load_state_dict(first.state_dict())
    for group, lr in zip(opt.param_groups, first.get_last_lr()):
        group["lr"] = lr  # (the optimizer's own state_dict restores this in real use)
    assert _lrs(resumed, 15)[1:] == full[11:]


def test_errors():
    with pytest.raises(ValueError, match="Invalid total_steps value: 3"):
        LinearDecayLR(_opt(), 3, warmup_steps=2)
    with pytest.raises(ValueError, match="Invalid warmup_steps value: -1"):
        LinearDecayLR(_opt(), 10, warmup_steps=-1)
    with pytest.raises(ValueError, match=r"Invalid final_lr_ratio value: 1\.5"):
        LinearDecayLR(_opt(), 10, final_lr_ratio=1.5)
    with pytest.raises(TypeError):
        LinearDecayLR(object(), 10)
