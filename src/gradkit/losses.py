r"""StableMax and the StableMax cross-entropy (Prieto, Barsbey, Mediano & Birdal 2025).

.. math::
    \begin{aligned}
    s(x) &= \begin{cases} x + 1 & x \ge 0 \\ \dfrac{1}{1 - x} & x < 0 \end{cases} \\
    \operatorname{StableMax}(z)_i &= \frac{s(z_i)}{\sum_j s(z_j)}, \qquad
    \ell(z, y) = -\log \operatorname{StableMax}(z)_y
    \end{aligned}

:math:`s` is continuous, :math:`s(0) = 1`, :math:`s'(0) = 1`, positive, and grows linearly,
so probabilities do not saturate to exactly 1 ("softmax collapse"). Unlike softmax,
StableMax is NOT shift invariant: never subtract the max logit first.

Paper: "Grokking at the Edge of Numerical Stability" (arXiv 2501.04697). Reference code
matched: ``LucasPrietoAl/grokking-at-the-edge-of-numerical-stability`` ``utils.py`` (``s``,
``log_stablemax``, ``stablemax_cross_entropy``, HEAD 0cc9e8d).

Choices:

* The reference adds ``1e-30`` to the denominator :math:`1 - x`. For :math:`x < 0`,
  :math:`1 - x > 1`, where ``1e-30`` is far below half an ulp in float32 and float64, so the
  addition never changes a value; we omit it. Instead the inactive branch of ``where`` is
  fed a clamped input, so gradients are finite in every dtype (evaluated on all inputs, the
  reference's ``1/(1 - x + 1e-30)`` has derivative 1e60 at :math:`x = 1`, which overflows in
  float32, and ``where`` then turns inf·0 into a NaN gradient).
* :math:`\log s(x)` is computed as ``log1p(x)`` / ``-log1p(-x)`` (more accurate than
  ``log(s(x))``, same value up to rounding).
* ``stablemax_cross_entropy`` computes in ``dtype`` (float64 by default, as the reference)
  and returns the loss in the logits' dtype; autograd runs through the float64 computation.
  Classes are on dim 1 (dim 0 for unbatched ``(C,)`` logits), as in
  ``torch.nn.functional.cross_entropy``; targets are class indices (no class weights, label
  smoothing or ``ignore_index``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

Reduction = Literal["mean", "sum", "none"]


def stablemax_s(x: Tensor) -> Tensor:
    """:math:`s(x)`: ``x + 1`` for ``x >= 0``, ``1 / (1 - x)`` for ``x < 0``."""
    return torch.where(x >= 0, x.clamp(min=0) + 1, 1 / (1 - x.clamp(max=0)))


def _log_s(x: Tensor) -> Tensor:
    return torch.where(x >= 0, torch.log1p(x.clamp(min=0)), -torch.log1p(-x.clamp(max=0)))


def stablemax(x: Tensor, dim: int = -1) -> Tensor:
    """``s(x) / s(x).sum(dim)``: probabilities along ``dim``."""
    s = stablemax_s(x)
    return s / s.sum(dim, keepdim=True)


def log_stablemax(x: Tensor, dim: int = -1) -> Tensor:
    """``log stablemax(x, dim)``, computed as ``log s(x) - log Σ s(x)``."""
    return _log_s(x) - torch.log(stablemax_s(x).sum(dim, keepdim=True))


class StableMax(nn.Module):
    """Module form of :func:`stablemax` along ``dim``."""

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return stablemax(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def stablemax_cross_entropy(logits: Tensor, target: Tensor, reduction: Reduction = "mean",
                            dtype: torch.dtype | None = torch.float64) -> Tensor:
    """:math:`-\\log \\operatorname{StableMax}(z_n)_{y_n}`, reduced like ``F.cross_entropy``.

    Args:
        logits: ``(N, C)``, ``(N, C, d1, ...)`` or unbatched ``(C,)``.
        target: class indices, ``(N,)``, ``(N, d1, ...)`` or a scalar.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        dtype: computation dtype (float64 as in the reference); ``None`` keeps the logits'.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"Invalid reduction: {reduction!r} (use 'mean', 'sum' or 'none')")
    if target.is_floating_point():
        raise TypeError("stablemax_cross_entropy expects class-index targets (an integer "
                        "tensor); class-probability targets are not supported")
    class_dim = 1 if logits.ndim >= 2 else 0
    if target.shape != logits.shape[:class_dim] + logits.shape[class_dim + 1:]:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits shape "
                         f"{tuple(logits.shape)} (classes on dim {class_dim})")
    z = logits if dtype is None else logits.to(dtype)
    logp = log_stablemax(z, dim=class_dim)
    loss = -logp.gather(class_dim, target.unsqueeze(class_dim).long()).squeeze(class_dim)
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss.to(logits.dtype)


class StableMaxCrossEntropyLoss(nn.Module):
    """Module form of :func:`stablemax_cross_entropy` (a drop-in for ``nn.CrossEntropyLoss``
    with class-index targets)."""

    def __init__(self, reduction: Reduction = "mean",
                 dtype: torch.dtype | None = torch.float64) -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"Invalid reduction: {reduction!r} (use 'mean', 'sum' or 'none')")
        self.reduction, self.dtype = reduction, dtype

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return stablemax_cross_entropy(logits, target, self.reduction, self.dtype)


__all__ = [
    "StableMax",
    "StableMaxCrossEntropyLoss",
    "log_stablemax",
    "stablemax",
    "stablemax_cross_entropy",
    "stablemax_s",
]
