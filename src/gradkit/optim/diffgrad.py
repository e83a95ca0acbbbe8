"""diffGrad (Dubey et al., 2019): Adam whose step is damped where the gradient barely changes.

As in ``torch/optim/adam.py``: a thin class and one function per path --
``_single_tensor_diffgrad`` (the readable reference), ``_multi_tensor_diffgrad``
(``torch._foreach_*``) and ``_fused_diffgrad`` (a ``torch.compile``'d kernel).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradkit._checks import check_betas, check_eps, check_impl_flags, check_lr, check_non_negative
from gradkit.optim._base import GradkitOptimizer, step_counter
from gradkit.optim._fused import fields, scalars
from gradkit.optim._packed import advance_steps, apply_elementwise, indices_by_value, pack_flat
from gradkit.optim._registry import register
from gradkit.optim._tiling import tiles

__all__ = ["DiffGrad"]

# the loop and foreach paths update tensors smaller than this packed together (_run_packed)
PACK_BELOW = 1 << 14
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "previous_grad")


@register("diffgrad")
class DiffGrad(GradkitOptimizer):
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

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate :math:`\gamma` (default: 1e-3).
        betas: coefficients :math:`(\beta_1, \beta_2)` of the running averages of the
            gradient and its square (default: (0.9, 0.999)).
        eps: term :math:`\epsilon` added to the denominator (default: 1e-8).
        weight_decay: L2 penalty :math:`\lambda`, added to the gradient (default: 0).
        legacy_alias_bug: reproduce the original ``diffGrad.py`` as it behaved with gradients
            accumulated in place: :math:`\xi \equiv 0.5` from step 2 on (default: False).
        maximize: maximize the objective instead of minimizing (default: False).
        foreach: use the ``torch._foreach_*`` implementation; None picks it on CUDA-class
            devices only, as torch does (default: None).
        fused: use the ``torch.compile``'d implementation; it does not recompile when a
            scheduler changes ``lr`` (default: None).

    Paper: S. R. Dubey et al., "diffGrad: An Optimization Method for Convolutional Neural
    Networks", IEEE TNNLS 2019. Matches ``diffGrad_v2.py`` of shivram1987/diffGrad
    (commit 93fb7fc): L2-style decay folded into the gradient; ``g_prev`` is the
    post-decay gradient and starts at zero, so :math:`\xi_1 = \operatorname{sigmoid}(|g_1|)`;
    ``eps`` is added to :math:`\sqrt{v_t}` with the bias corrections folded into the step size;
    :math:`\xi` scales only the step (the stored :math:`m_t` is not multiplied by it).

    Choices: the original ``diffGrad.py`` stored ``previous_grad`` as an alias of ``p.grad``;
    with gradients zeroed and accumulated in place its friction was 0.5 from step 2 on (Adam at
    half the step), with ``zero_grad(set_to_none=True)`` it was v2. gradkit follows v2 and
    offers ``legacy_alias_bug=True`` for the other. ``p.grad`` is never modified (the
    reference adds the decay into it in place).
    State per parameter: ``step`` (float32 CPU scalar tensor), ``exp_avg``, ``exp_avg_sq``,
    ``previous_grad``.

    Example (first step from zero state: :math:`\xi_1 = \operatorname{sigmoid}(1)`)::

        >>> import torch
        >>> from gradkit.optim import DiffGrad
        >>> theta = torch.nn.Parameter(torch.zeros(1))
        >>> opt = DiffGrad([theta], lr=1e-3)
        >>> theta.grad = torch.ones(1)
        >>> opt.step()
        >>> print(f"{theta.item():.4e}")
        -7.3106e-04
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

    def _init_group(self, params: list[Tensor]) -> tuple[list[Tensor], ...]:
        steps = [step_counter(self.state[p], p) for p in params]
        for p in params:
            state = self.state[p]
            for key in _STATE_KEYS:
                if key not in state:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return steps, *([self.state[p][k] for p in params] for k in _STATE_KEYS)

    def _single_tensor(self, group: dict, params: list[Tensor], grads: list[Tensor],
                       *state: list[Tensor]) -> None:
        self._run_packed(_single_tensor_diffgrad, group, params, grads)

    def _multi_tensor(self, group: dict, params: list[Tensor], grads: list[Tensor],
                      *state: list[Tensor]) -> None:
        self._run_packed(_multi_tensor_diffgrad, group, params, grads)

    def _run_packed(self, update: Callable[..., None], group: dict, params: list[Tensor],
                    grads: list[Tensor]) -> None:
        """``update`` on the small tensors (below :data:`PACK_BELOW` elements) packed into
        one flat tensor per step count, and one cache-sized slice at a time
        (:mod:`~gradkit.optim._tiling`; large tensors cut into pieces). The update is
        elementwise, so the regrouped tensors are stepped exactly as the originals would be,
        with a handful of ops per pack instead of per tensor, and from cache."""
        steps = advance_steps(self, params)
        small = [i for i, p in enumerate(params) if p.numel() < PACK_BELOW]
        small = small if len(small) > 1 else []
        rest = sorted(set(range(len(params))) - set(small))
        lists = [[ts[i] for i in rest] for ts in
                 (params, grads, *([self.state[p][k] for p in params] for k in _STATE_KEYS))]
        step_list = [steps[i] for i in rest]
        write_backs = []
        for step, positions in indices_by_value([steps[i] for i in small]).items():
            p_flat, g_flat, bufs, write_back = pack_flat(
                self, params, grads, _STATE_KEYS, [small[j] for j in positions])
            for ts, t in zip(lists, (p_flat, g_flat, *bufs)):
                ts.append(t)
            step_list.append(step)
            write_backs.append(write_back)
        for part, (part_steps,) in tiles(lists, [step_list]):
            update(*part, part_steps, **_diffgrad_args(group))
        for write_back in write_backs:
            write_back()

    def _fused(self, group: dict, params: list[Tensor], grads: list[Tensor],
               *state: list[Tensor]) -> None:
        _fused_diffgrad(self, group, params, grads)


def _diffgrad_args(group: dict) -> dict[str, Any]:
    beta1, beta2 = group["betas"]
    return dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], legacy_alias_bug=group["legacy_alias_bug"],
                maximize=group["maximize"])


def _step_size(lr: float, beta1: float, beta2: float, step: float) -> float:
    """:math:`\\alpha_t = \\gamma \\sqrt{1 - \\beta_2^t} / (1 - \\beta_1^t)`."""
    return lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)


def _single_tensor_diffgrad(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                            exp_avg_sqs: list[Tensor], previous_grads: list[Tensor],
                            steps: list[float], *, lr: float, beta1: float, beta2: float,
                            eps: float, weight_decay: float, legacy_alias_bug: bool,
                            maximize: bool) -> None:
    """``steps``: each tensor's step count ``t`` after this step (as for every path)."""
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        exp_avg, exp_avg_sq, previous_grad = exp_avgs[i], exp_avg_sqs[i], previous_grads[i]
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if legacy_alias_bug and steps[i] > 1:
            previous_grad.copy_(grad)  # the aliased buffer equals the gradient: ξ = 0.5
        friction = torch.sigmoid((previous_grad - grad).abs())
        previous_grad.copy_(grad)
        denom = exp_avg_sq.sqrt().add_(eps)
        param.addcdiv_(friction * exp_avg, denom,
                       value=-_step_size(lr, beta1, beta2, steps[i]))


def _multi_tensor_diffgrad(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                           exp_avg_sqs: list[Tensor], previous_grads: list[Tensor],
                           steps: list[float], *, lr: float, beta1: float, beta2: float,
                           eps: float, weight_decay: float, legacy_alias_bug: bool,
                           maximize: bool) -> None:
    if maximize:
        grads = list(torch._foreach_neg(grads))
    if weight_decay != 0:
        grads = list(torch._foreach_add(grads, params, alpha=weight_decay))
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    if legacy_alias_bug:
        later = [i for i, s in enumerate(steps) if s > 1]
        if later:
            torch._foreach_copy_([previous_grads[i] for i in later], [grads[i] for i in later])
    # ξ ⊙ m, computed in the previous-gradient buffers, which then take the new gradient
    torch._foreach_sub_(previous_grads, grads)
    torch._foreach_abs_(previous_grads)
    torch._foreach_sigmoid_(previous_grads)
    torch._foreach_mul_(previous_grads, exp_avgs)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(params, previous_grads, denoms,
                            [-_step_size(lr, beta1, beta2, s) for s in steps])
    torch._foreach_copy_(previous_grads, grads)


class _DiffGradScalars(NamedTuple):
    sign: float  # -1 when maximizing
    weight_decay: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    neg_step: float  # -α_t
    keep_previous: float  # 0 for legacy_alias_bug after step 1 (ξ = 0.5), else 1


def _fused_diffgrad(opt: torch.optim.Optimizer, group: dict, params: list[Tensor],
                    grads: list[Tensor]) -> None:
    """:func:`_diffgrad_kernel` over the params (one device and dtype), once per step count,
    with the hyperparameters as a tensor: changing ``lr`` does not recompile."""
    a = _diffgrad_args(group)
    for step, idx in indices_by_value(advance_steps(opt, params)).items():
        s = scalars(_DiffGradScalars(
            -1.0 if a["maximize"] else 1.0, a["weight_decay"], 1 - a["beta1"], a["beta2"],
            1 - a["beta2"], a["eps"], -_step_size(a["lr"], a["beta1"], a["beta2"], step),
            0.0 if a["legacy_alias_bug"] and step > 1 else 1.0), params[0])
        apply_elementwise(opt, _diffgrad_kernel, params, grads, _STATE_KEYS, s, indices=idx)


def _diffgrad_kernel(p: Tensor, g: Tensor, m: Tensor, v: Tensor, prev: Tensor,
                     s: Tensor) -> None:
    """One diffGrad step of flat tensors, in place (compiled by
    :func:`~gradkit.optim._packed.apply_elementwise`)."""
    h = fields(_DiffGradScalars, s)
    g = g * h.sign + p * h.weight_decay
    m_new = m + (g - m) * h.one_minus_beta1
    v_new = v * h.beta2 + g * g * h.one_minus_beta2
    # ξ m / (√v + ε) with sigmoid(x) = 1 / (1 + e^{-x}) folded into a single division
    inv_xi = 1.0 + torch.exp(-(prev - g).abs() * h.keep_previous)
    p.copy_(p + h.neg_step * m_new / (inv_xi * (v_new.sqrt() + h.eps)))
    m.copy_(m_new)
    v.copy_(v_new)
    prev.copy_(g)
