"""diffGrad (Dubey et al., 2019): Adam whose step is damped where the gradient barely changes."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from gradkit.optim import _fused
from gradkit.optim._base import (
    add_l2_decay,
    check_betas,
    check_eps,
    check_impl_flags,
    check_lr,
    check_non_negative,
    maybe_negate,
    step_counter,
)
from gradkit.optim._moments import init_adam_state, update_adam_moments
from gradkit.optim._registry import register

__all__ = ["DiffGrad"]

# the loop and foreach paths update tensors smaller than this packed together (see _eager)
PACK_BELOW = 1 << 14
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "previous_grad")


@register("diffgrad")
class DiffGrad(_fused.MultiPathOptimizer):
    r"""diffGrad, version 2 of the authors' code (the version their README recommends).

    .. math::
        \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)}, \beta_1, \beta_2, \epsilon,
                \lambda \text{ (weight decay)}; \quad m_0, v_0, g_0^{\text{prev}} \leftarrow 0 \\
            &\textbf{for } t = 1, 2, \ldots \textbf{ do} \\
            &\hspace{5mm} g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})
                \ (\text{negated if maximize}) \\
            &\hspace{5mm} \textbf{if } \lambda \neq 0: \
                g_t \leftarrow g_t + \lambda \theta_{t-1} \\
            &\hspace{5mm} m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
            &\hspace{5mm} v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
            &\hspace{5mm} \xi_t \leftarrow \operatorname{sigmoid}(|g^{\text{prev}} - g_t|),
                \quad g^{\text{prev}} \leftarrow g_t \\
            &\hspace{5mm} \alpha_t \leftarrow \gamma \sqrt{1 - \beta_2^t} / (1 - \beta_1^t) \\
            &\hspace{5mm} \theta_t \leftarrow \theta_{t-1}
                - \alpha_t \, \xi_t \odot m_t / (\sqrt{v_t} + \epsilon)
        \end{aligned}

    Paper: S. R. Dubey et al., "diffGrad: An Optimization Method for Convolutional Neural
    Networks", IEEE TNNLS 2019. Matches ``diffGrad_v2.py`` of shivram1987/diffGrad
    (commit 93fb7fc): L2-style decay folded into the gradient; ``g_prev`` is the
    post-decay gradient and starts at zero, so :math:`\xi_1 = \operatorname{sigmoid}(|g_1|)`;
    ``eps`` is added to :math:`\sqrt{v_t}` with the bias corrections folded into the step size;
    :math:`\xi` scales only the step (the stored :math:`m_t` is not multiplied by it).

    Choices: ``legacy_alias_bug=True`` reproduces the original ``diffGrad.py`` as it behaved
    with gradients accumulated in place (``previous_grad`` aliased ``p.grad``): from step 2 on
    :math:`\xi \equiv 0.5`, i.e. Adam at half the step. ``p.grad`` is never modified (the
    reference adds the decay into it in place). ``fused=True`` runs a ``torch.compile``'d
    kernel (compiled once; hyperparameters passed as tensors, so lr schedules do not
    recompile).

    State per parameter: ``step`` (float32 CPU scalar tensor), ``exp_avg``, ``exp_avg_sq``,
    ``previous_grad``.
    """

    _name = "DiffGrad"

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, legacy_alias_bug: bool = False,
                 maximize: bool = False, foreach: bool | None = None,
                 fused: bool | None = None) -> None:
        check_lr(lr)
        check_betas(betas)
        check_eps(eps)
        check_non_negative("weight_decay", weight_decay)
        check_impl_flags(foreach, fused, False)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        legacy_alias_bug=legacy_alias_bug, maximize=maximize,
                        foreach=foreach, fused=fused)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("legacy_alias_bug", False)

    def _init_state(self, params: list[Tensor]) -> tuple[list[Tensor], ...]:
        steps, exp_avgs, exp_avg_sqs, prevs = [], [], [], []
        for p in params:
            state = self.state[p]
            step_counter(state, p)
            init_adam_state(state, p)
            if "previous_grad" not in state:
                state["previous_grad"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            steps.append(state["step"])
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            prevs.append(state["previous_grad"])
        return steps, exp_avgs, exp_avg_sqs, prevs

    def _loop(self, group: dict, params: list[Tensor], grads: list[Tensor], _steps,
              *lists: list[Tensor]) -> None:
        self._eager(group, params, grads, lists, _diffgrad_loop)

    def _foreach(self, group: dict, params: list[Tensor], grads: list[Tensor], _steps,
                 *lists: list[Tensor]) -> None:
        self._eager(group, params, grads, lists, _diffgrad_foreach)

    def _eager(self, group: dict, params: list[Tensor], grads: list[Tensor],
               lists: tuple[list[Tensor], ...], update: Callable[..., None]) -> None:
        """Run ``update`` (loop or foreach body) on cache-sized pieces. The update is
        elementwise, so it may regroup elements freely: tensors below :data:`PACK_BELOW`
        elements are packed into one flat tensor per step count (fewer, larger ops), large
        ones are cut into flat pieces that stay in cache for all ops of the step
        (:func:`~gradkit.optim._fused.cut_into_pieces`)."""
        step_values = _fused.advance_packed_steps(self, params)
        small = [i for i, p in enumerate(params) if p.numel() < PACK_BELOW]
        if len(small) < 2:
            small = []
        taken = set(small)
        rest = [i for i in range(len(params)) if i not in taken]
        ps, gs = [params[i] for i in rest], [grads[i] for i in rest]
        states = [[state[i] for i in rest] for state in lists]
        steps = [step_values[i] for i in rest]
        write_backs = []
        for step, positions in _fused.indices_by_value([step_values[i] for i in small]).items():
            p_flat, g_flat, bufs, write_back = _fused.pack_flat(
                self, params, grads, _STATE_KEYS, [small[j] for j in positions])
            ps.append(p_flat)
            gs.append(g_flat)
            for state, buf in zip(states, bufs):
                state.append(buf)
            steps.append(step)
            write_backs.append(write_back)
        lists, steps, _ = _fused.cut_into_pieces([ps, gs, *states], steps)
        for part in _fused.cache_slices(lists[0], _fused.PIECE_BYTES):
            update(group, *(ts[part] for ts in lists[:2]), steps[part],
                   *(ts[part] for ts in lists[2:]))
        for write_back in write_backs:
            write_back()

    def _fused(self, group: dict, params: list[Tensor], grads: list[Tensor],
               *state_lists: list[Tensor]) -> None:
        lr, beta1, beta2, eps, wd = _hyper(group)
        kernel = _fused.compiled(_diffgrad_kernel)
        sign = -1.0 if group["maximize"] else 1.0
        step_values = _fused.advance_packed_steps(self, params)
        for step, idx in _fused.indices_by_value(step_values).items():
            keep = 0.0 if group["legacy_alias_bug"] and step > 1 else 1.0
            s = _fused.scalars((sign, wd, 1.0 - beta1, beta2, 1.0 - beta2, eps,
                                -_step_size(lr, beta1, beta2, step), keep), params[0])
            _fused.apply_elementwise(self, kernel, params, grads, _STATE_KEYS, s, indices=idx)


def _hyper(group: dict) -> tuple[float, float, float, float, float]:
    beta1, beta2 = group["betas"]
    return float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"]


def _step_size(lr: float, beta1: float, beta2: float, step: float) -> float:
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def _diffgrad_loop(group: dict, params: list[Tensor], grads: list[Tensor],
                   step_values: list[float], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                   prevs: list[Tensor]) -> None:
    lr, beta1, beta2, eps, wd = _hyper(group)
    maximize, legacy = group["maximize"], group["legacy_alias_bug"]
    for p, g, step, m, v, prev in zip(params, grads, step_values, exp_avgs, exp_avg_sqs, prevs):
        if maximize:
            g = torch.neg(g)
        if wd != 0:
            g = g.add(p, alpha=wd)
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        if legacy and step > 1:
            prev.copy_(g)
        xi_m = prev.sub_(g).abs_().sigmoid_().mul_(m)  # ξ ⊙ m, in the g_prev buffer
        p.addcdiv_(xi_m, v.sqrt().add_(eps), value=-_step_size(lr, beta1, beta2, step))
        prev.copy_(g)


def _diffgrad_foreach(group: dict, params: list[Tensor], grads: list[Tensor],
                      step_values: list[float], exp_avgs: list[Tensor],
                      exp_avg_sqs: list[Tensor], prevs: list[Tensor]) -> None:
    lr, beta1, beta2, eps, wd = _hyper(group)
    grads = maybe_negate(grads, group["maximize"], True)
    grads = add_l2_decay(grads, params, wd, True)
    update_adam_moments(exp_avgs, exp_avg_sqs, grads, beta1, beta2, True)
    if group["legacy_alias_bug"]:
        later = [i for i, s in enumerate(step_values) if s > 1]
        if later:
            torch._foreach_copy_([prevs[i] for i in later], [grads[i] for i in later])
    torch._foreach_sub_(prevs, grads)
    torch._foreach_abs_(prevs)
    torch._foreach_sigmoid_(prevs)
    torch._foreach_mul_(prevs, exp_avgs)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    neg_sizes = [-_step_size(lr, beta1, beta2, s) for s in step_values]
    torch._foreach_addcdiv_(params, prevs, denom, neg_sizes)
    torch._foreach_copy_(prevs, grads)


def _diffgrad_kernel(p: Tensor, g: Tensor, m: Tensor, v: Tensor, prev: Tensor,
                     s: Tensor) -> None:
    """One fused diffGrad update; ``s`` = (sign, wd, 1-β1, β2, 1-β2, eps, -α_t, keep_prev)."""
    g = g * s[0] + p * s[1]
    m_new = m + (g - m) * s[2]
    v_new = v * s[3] + g * g * s[4]
    # ξ m / (√v + ε) with sigmoid(x) = 1 / (1 + e^{-x}) folded into a single division
    inv_xi = 1.0 + torch.exp(-(prev - g).abs() * s[7])
    p.copy_(p + s[6] * m_new / (inv_xi * (v_new.sqrt() + s[5])))
    m.copy_(m_new)
    v.copy_(v_new)
    prev.copy_(g)
