"""Learning rate as a function of batch size (methods.md §13)."""

import math

import pytest
import torch

from gradkit.batching import default_lr_rule, lr_scale_factor, scale_lr


def test_known_answer():
    assert scale_lr(0.1, 128, 512, "linear") == pytest.approx(0.4, rel=1e-15)
    assert scale_lr(0.1, 128, 512, "sqrt") == pytest.approx(0.2, rel=1e-15)
    assert scale_lr(0.1, 128, 128, "linear") == 0.1 == scale_lr(0.1, 128, 128, "sqrt")
    assert scale_lr(0.3, 100, 50, "sqrt") == pytest.approx(0.3 / math.sqrt(2))
    assert lr_scale_factor(2, 18, "sqrt") == pytest.approx(3.0)


def test_default_rule_by_optimizer():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert default_lr_rule(torch.optim.SGD(p, lr=0.1, momentum=0.9)) == "linear"
    for cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.RMSprop):
        assert default_lr_rule(cls(p)) == "sqrt"
    with pytest.raises(ValueError, match="lr_rule='linear'"):
        default_lr_rule(torch.optim.LBFGS(p))


def test_errors():
    with pytest.raises(ValueError, match="Invalid rule"):
        scale_lr(0.1, 1, 2, "cubic")
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        scale_lr(-1, 1, 2, "linear")
    with pytest.raises(ValueError, match="Invalid batch_size0 value"):
        scale_lr(0.1, 0, 2, "linear")
