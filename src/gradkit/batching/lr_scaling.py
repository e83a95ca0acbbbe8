r"""Learning rate as a function of batch size (Granziol, Zohren & Roberts, JMLR 2022).

.. math::
    \begin{aligned}
    &\textbf{linear (SGD, momentum SGD):}\quad \eta(B) = \eta(B_0)\,\frac{B}{B_0} \\
    &\textbf{square root (Adam and other adaptive methods):}\quad
        \eta(B) = \eta(B_0)\,\sqrt{\frac{B}{B_0}}
    \end{aligned}

Paper: "Learning Rates as a Function of Batch Size: A Random Matrix Theory Approach to Neural
Network Training" (arXiv 2006.09092). No reference code exists; the rules are the paper's.
They hold below the critical batch size, whose value the
paper does not pin down, so the caller decides when to stop growing the batch.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import optim

from gradkit._checks import check_positive

LRRule = Literal["linear", "sqrt"]

# torch optimizers whose update is preconditioned by gradient statistics -> square-root rule.
_ADAPTIVE = (optim.Adam, optim.AdamW, optim.Adagrad, optim.RMSprop, optim.NAdam, optim.RAdam,
             optim.Adamax, optim.Adadelta)


def lr_scale_factor(batch_size0: int, batch_size: int, rule: LRRule) -> float:
    """``B/B0`` (``rule="linear"``) or ``sqrt(B/B0)`` (``rule="sqrt"``)."""
    check_positive("batch_size0", batch_size0)
    check_positive("batch_size", batch_size)
    ratio = batch_size / batch_size0
    if rule == "linear":
        return ratio
    if rule == "sqrt":
        return math.sqrt(ratio)
    raise ValueError(f"Invalid rule: {rule!r} (use 'linear' or 'sqrt')")


def scale_lr(lr0: float, batch_size0: int, batch_size: int, rule: LRRule) -> float:
    """The learning rate for ``batch_size`` given ``lr0`` tuned at ``batch_size0``.

    >>> scale_lr(0.1, 128, 512, "linear"), scale_lr(0.1, 128, 512, "sqrt")
    (0.4, 0.2)
    """
    if not (lr0 >= 0 and math.isfinite(lr0)):
        raise ValueError(f"Invalid learning rate: {lr0}")
    return lr0 * lr_scale_factor(batch_size0, batch_size, rule)


def default_lr_rule(optimizer: optim.Optimizer) -> LRRule:
    """``"linear"`` for torch's SGD, ``"sqrt"`` for torch's adaptive optimizers.

    Raises:
        ValueError: for any other optimizer; pass ``lr_rule="linear"`` or ``"sqrt"``.
    """
    if isinstance(optimizer, optim.SGD):
        return "linear"
    if isinstance(optimizer, _ADAPTIVE):
        return "sqrt"
    raise ValueError(
        f"cannot tell which batch-size learning-rate rule fits {type(optimizer).__name__}; "
        "pass lr_rule='linear' (SGD-like) or lr_rule='sqrt' (adaptive, Adam-like)"
    )
