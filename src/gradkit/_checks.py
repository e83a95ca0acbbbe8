"""Argument checks shared across gradkit (the one validation module).

Messages use torch.optim's wording, so that a user sees the same error from a gradkit
optimizer as from ``torch.optim.Adam``: ``Invalid learning rate: -1``, ``Invalid epsilon
value: -0.1``, ``Invalid beta parameter at index 0: 1.0``, ``Invalid weight_decay value: -1``.
Every check raises ``ValueError`` (the flag combinations torch refuses raise ``RuntimeError``,
as torch does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor


def _as_float(value: float | Tensor, name: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        return float(value.item())
    return float(value)


def check_lr(lr: float | Tensor) -> None:
    value = _as_float(lr, "lr")
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"Invalid learning rate: {lr}")


def check_eps(eps: float, name: str = "eps") -> None:
    """``Invalid epsilon value: <eps>`` (``Invalid <name> value`` for another name)."""
    if not (eps >= 0.0 and math.isfinite(eps)):
        what = "epsilon" if name == "eps" else name
        raise ValueError(f"Invalid {what} value: {eps}")


def check_betas(betas: Sequence[float | Tensor]) -> None:
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: expected a pair, got {betas!r}")
    for index, beta in enumerate(betas):
        if not 0.0 <= _as_float(beta, f"betas[{index}]") < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {betas[index]}")


def check_non_negative(name: str, value: float) -> None:
    """``Invalid <name> value: <value>`` unless ``0 <= value < inf`` (e.g. ``weight_decay``)."""
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"Invalid {name} value: {value}")


def check_in_interval(name: str, value: float, low: float, high: float, *,
                      closed_high: bool = False) -> None:
    """``low <= value < high`` (``<= high`` when ``closed_high``), else ValueError naming it."""
    ok = low <= value <= high if closed_high else low <= value < high
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"Invalid {name} value: {value} (must be in [{low}, {high}{bracket})")


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name} value: {value!r} (must be a positive integer)")


def check_positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"Invalid {name} value: {value} (must be a positive number)")


def check_impl_flags(foreach: bool | None, fused: bool | None, differentiable: bool) -> None:
    """The flag combinations torch refuses in an optimizer's ``__init__`` (RuntimeError)."""
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if fused and differentiable:
        raise RuntimeError("`fused` does not support `differentiable`")
    if foreach and differentiable:
        raise RuntimeError("`foreach` does not support `differentiable`; use foreach=False")
