"""Pieces every gradkit optimizer shares: argument validation, choosing the loop / foreach /
fused path like torch does, collecting (param, grad) pairs, and decoupled / L2 weight decay.

Conventions (see ``shared/specs/conventions.md`` §1): hyperparameters live in ``defaults`` and
are read from ``group[...]`` in ``step``; ``foreach=None`` means auto, and auto is on only for
CUDA-class devices (so the loop on CPU); ``fused`` and ``foreach`` are never both True;
``differentiable=True`` uses the loop; sparse gradients raise ``RuntimeError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.optim.optimizer import _default_to_fused_or_foreach

from gradkit._checks import check_positive_int  # noqa: F401  (re-exported for optimizers)

Impl = Literal["loop", "foreach", "fused"]


# ---------------------------------------------------------------------------- validation
def _as_float(value: float | Tensor, name: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
        return float(value.item())
    return float(value)


def check_lr(lr: float | Tensor) -> None:
    value = _as_float(lr, "lr")
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"Invalid learning rate: {lr}")


def check_eps(eps: float, name: str = "eps") -> None:
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"Invalid epsilon value: {name}={eps}")


def check_betas(betas: Sequence[float]) -> None:
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: expected a pair, got {betas!r}")
    for index, beta in enumerate(betas):
        beta = _as_float(beta, f"betas[{index}]")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {betas[index]}")


def check_non_negative(name: str, value: float) -> None:
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"Invalid {name} value: {value}")


def check_in_interval(name: str, value: float, low: float, high: float, *,
                      closed_high: bool = False) -> None:
    """``low <= value < high`` (``<= high`` when ``closed_high``), else ValueError naming it."""
    ok = low <= value <= high if closed_high else low <= value < high
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"Invalid {name} value: {value} (must be in [{low}, {high}{bracket})")


def check_impl_flags(foreach: bool | None, fused: bool | None, differentiable: bool) -> None:
    """The flag combinations torch refuses in ``__init__``."""
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if fused and differentiable:
        raise RuntimeError("`fused` does not support `differentiable`")
    if foreach and differentiable:
        raise RuntimeError("`foreach` does not support `differentiable`; use foreach=False")


# ------------------------------------------------------------------------ path selection
def resolve_impl(params: Sequence[Tensor], foreach: bool | None, fused: bool | None,
                 differentiable: bool) -> Impl:
    """Pick the execution path for one param group, with torch's auto rules."""
    if fused:
        return "fused"
    if foreach is None:
        _, foreach = _default_to_fused_or_foreach(list(params), differentiable, use_fused=False)
    return "foreach" if foreach and not differentiable else "loop"


def group_by_device_and_dtype(tensorlists: list[list[Tensor]]):
    """``{(device, dtype): (tensorlists, indices)}`` as ``torch.optim`` groups for foreach."""
    return torch.optim.Optimizer._group_tensors_by_device_and_dtype(tensorlists)


# ---------------------------------------------------------------------------- gradients
def reject_sparse(optimizer_name: str, grad: Tensor) -> None:
    if grad.is_sparse:
        raise RuntimeError(
            f"{optimizer_name} does not support sparse gradients; use a dense embedding "
            "(sparse=False) or torch.optim.SparseAdam for sparse parameters"
        )


def params_with_grad(optimizer_name: str, group: dict) -> tuple[list[Tensor], list[Tensor]]:
    """Parameters of ``group`` that have a gradient, and those gradients (sparse refused)."""
    params: list[Tensor] = []
    grads: list[Tensor] = []
    for p in group["params"]:
        if p.grad is None:
            continue
        reject_sparse(optimizer_name, p.grad)
        if torch.is_complex(p):
            raise RuntimeError(f"{optimizer_name} does not support complex parameters")
        params.append(p)
        grads.append(p.grad)
    return params, grads


def maybe_negate(grads: list[Tensor], maximize: bool, foreach: bool) -> list[Tensor]:
    """``-g`` for ``maximize`` without touching ``p.grad``."""
    if not maximize:
        return grads
    return list(torch._foreach_neg(grads)) if foreach else [torch.neg(g) for g in grads]


def add_l2_decay(grads: list[Tensor], params: list[Tensor], weight_decay: float,
                 foreach: bool) -> list[Tensor]:
    """``g + wd * p`` (coupled, L2-style decay) as new tensors; ``p.grad`` is untouched."""
    if weight_decay == 0:
        return grads
    if foreach:
        return list(torch._foreach_add(grads, params, alpha=weight_decay))
    return [g.add(p, alpha=weight_decay) for g, p in zip(grads, params)]


def scale_(params: list[Tensor], factor: float, foreach: bool) -> None:
    """``p <- p * factor`` in place for every param (nothing when ``factor == 1``)."""
    if factor == 1.0 or not params:
        return
    if foreach:
        torch._foreach_mul_(params, factor)
    else:
        for p in params:
            p.mul_(factor)


def apply_decoupled_decay(params: list[Tensor], lr: float, weight_decay: float,
                          foreach: bool, ratios: Sequence[float] | None = None) -> None:
    """AdamW-style ``p <- p * (1 - lr * wd * ratio)`` in place (``ratio`` defaults to 1)."""
    if weight_decay == 0 or lr == 0:
        return
    if ratios is None:
        scale_(params, 1.0 - lr * weight_decay, foreach)
        return
    factors = [1.0 - lr * weight_decay * r for r in ratios]
    if foreach:
        torch._foreach_mul_(params, factors)
    else:
        for p, f in zip(params, factors):
            p.mul_(f)


def step_counter(state: dict, param: Tensor) -> Tensor:
    """The float32 scalar ``state['step']`` tensor (on CPU, as torch keeps it)."""
    if "step" not in state:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
    return state["step"]


# ----------------------------------------------------------------------- step helpers
def evaluate_closure(closure) -> object:
    """The loss from ``closure()`` called under ``torch.enable_grad()`` (None if no closure)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def group_gradients(optimizer_name: str, group: dict, *, foreach_key: str = "foreach",
                    negate: bool = True) -> tuple[list[Tensor], list[Tensor], bool]:
    """``(params, grads, use_foreach)`` of a group: grad None skipped, sparse refused, and
    ``-g`` when ``group["maximize"]`` (unless ``negate=False``); ``p.grad`` is untouched."""
    params, grads = params_with_grad(optimizer_name, group)
    if not params:
        return params, grads, False
    foreach = resolve_impl(params, group[foreach_key], None, False) == "foreach"
    if negate:
        grads = maybe_negate(grads, group["maximize"], foreach)
    return params, grads, foreach
