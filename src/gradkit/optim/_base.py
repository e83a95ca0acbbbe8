"""What every gradkit optimizer shares: the base class with its ``step`` skeleton, the choice
of path (loop / foreach / fused) by torch's rules, and small gradient helpers.

torch.optim's conventions, kept here once: hyperparameters live in ``defaults`` and are read
from ``group[...]`` in ``step``; ``foreach=None`` means auto, and auto is on only for
CUDA-class devices (so the loop on CPU); ``fused`` and ``foreach`` are never both True;
sparse gradients raise ``RuntimeError``; ``p.grad`` is never modified.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor

from gradkit.optim._torch_private import default_foreach

Impl = Literal["loop", "foreach", "fused"]


def resolve_impl(params: Sequence[Tensor], foreach: bool | None, fused: bool | None,
                 differentiable: bool = False) -> Impl:
    """The execution path for one param group, with torch's auto rules."""
    if fused:
        return "fused"
    if foreach is None:
        foreach = default_foreach(params, differentiable)
    return "foreach" if foreach and not differentiable else "loop"


def by_device_and_dtype(params: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``params`` grouped by (device, dtype), as foreach ops want them."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    return list(groups.values())


def tensor_steps(optimizer: torch.optim.Optimizer) -> None:
    """Turn ``state['step']`` values that are Python numbers (as other packages save them)
    into float32 CPU scalar tensors, as ``torch.optim.Adam.__setstate__`` does on load."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "step" in state and not torch.is_tensor(state["step"]):
                state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)


def require_shared(optimizer: torch.optim.Optimizer, keys: Iterable[str], why: str) -> None:
    """Refuse per-group values of ``keys`` (hyperparameters one model-wide structure uses):
    ``ValueError`` naming the key, its values and ``why``."""
    for key in keys:
        values = {group[key] for group in optimizer.param_groups}
        if len(values) > 1:
            raise ValueError(f"Invalid {key} value: {sorted(values, key=str)} ({why})")


def step_counter(state: dict, param: Tensor) -> Tensor:
    """The float32 scalar ``state['step']`` tensor (on CPU, as torch keeps it)."""
    if "step" not in state:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
    return state["step"]


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


def apply_decoupled_decay(params: list[Tensor], lr: float, weight_decay: float,
                          foreach: bool) -> None:
    """AdamW-style ``p <- p * (1 - lr * wd)`` in place."""
    if weight_decay == 0 or lr == 0 or not params:
        return
    if foreach:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    else:
        for p in params:
            p.mul_(1.0 - lr * weight_decay)


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
    foreach = resolve_impl(params, group[foreach_key], None) == "foreach"
    if negate:
        grads = maybe_negate(grads, group["maximize"], foreach)
    return params, grads, foreach


# --------------------------------------------------------------------------- base class
class GradkitOptimizer(torch.optim.Optimizer):
    """``step`` skeleton of the gradkit optimizers with loop / foreach / fused paths.

    Subclasses set ``_name`` and implement ``_init_group(params)``, which creates missing
    state lazily and returns the state tensor lists (parallel to ``params``), and
    ``_single_tensor`` / ``_multi_tensor`` / ``_fused``, each called as
    ``(group, params, grads, *state_lists)`` -- foreach and fused once per (device, dtype).
    The closure runs under ``torch.enable_grad()``; params whose grad is None are skipped
    (their state is created when a grad first appears); sparse grads raise ``RuntimeError``.
    """

    _name = "Optimizer"

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
        tensor_steps(self)

    def _init_group(self, params: list[Tensor]) -> tuple[list[Tensor], ...]:
        raise NotImplementedError

    def _single_tensor(self, group: dict, params: list[Tensor], grads: list[Tensor],
                       *state: list[Tensor]) -> None:
        raise NotImplementedError

    _multi_tensor = _fused = _single_tensor

    @torch.no_grad()
    def step(self, closure: Callable[[], object] | None = None) -> object:
        """Perform one optimisation step; ``closure`` re-evaluates and returns the loss."""
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            params, grads = params_with_grad(self._name, group)
            if not params:
                continue
            state_lists = self._init_group(params)
            impl = resolve_impl(params, group["foreach"], group["fused"])
            if impl == "loop":
                self._single_tensor(group, params, grads, *state_lists)
                continue
            run = self._fused if impl == "fused" else self._multi_tensor
            for idx in by_device_and_dtype(params):
                run(group, *([ts[i] for i in idx] for ts in (params, grads, *state_lists)))
        return loss
