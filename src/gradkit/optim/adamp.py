"""AdamP and SGDP (Heo et al., ICLR 2021): updates projected off the radial direction of
scale-invariant weights, so normalisation layers cannot shrink the effective step size.

As in ``torch/optim/adam.py``: thin classes, and one function per path.
``_single_tensor_adamp`` / ``_single_tensor_sgdp`` are the readable reference (the docstring's
equations, one tensor at a time); ``_multi_tensor_*`` run the same math with
``torch._foreach_*`` ops (the projection test batched over same-shaped tensors);
``_fused_*`` run a ``torch.compile``'d kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim.optimizer import required

from gradkit._checks import (
    check_betas,
    check_eps,
    check_impl_flags,
    check_in_interval,
    check_lr,
    check_non_negative,
)
from gradkit.optim._base import GradkitOptimizer, step_counter
from gradkit.optim._fused import fields, scalars
from gradkit.optim._packed import advance_steps, apply_rows, indices_by_value
from gradkit.optim._projection import coefficients, decide_early, project, project_many
from gradkit.optim._registry import register
from gradkit.optim._tiling import tiles

__all__ = ["SGDP", "AdamP"]


def _check_projection_args(eps: float, weight_decay: float, delta: float,
                           wd_ratio: float) -> None:
    check_eps(eps)
    check_non_negative("weight_decay", weight_decay)
    check_non_negative("delta", delta)
    check_in_interval("wd_ratio", wd_ratio, 0.0, 1.0, closed_high=True)


def _decay_factors(lr: float, weight_decay: float, wd_ratio: float,
                   scale: float = 1.0) -> tuple[float, float]:
    """``p <- p * factor`` before the step: (factor, factor when projected)."""
    lr_wd = lr * weight_decay * scale
    return 1.0 - lr_wd, 1.0 - lr_wd * wd_ratio


def _decay_(params: list[Tensor], passed: list[Tensor | bool], plain: float,
            projected: float) -> None:
    """``p <- p * (projected if passed else plain)``, with no host sync for tensor flags."""
    if plain == projected == 1.0:
        return
    for p, ok in zip(params, passed):
        if isinstance(ok, Tensor):
            p.mul_(torch.tensor([plain, projected], dtype=p.dtype, device=p.device)[ok.long()])
        else:
            p.mul_(projected if ok else plain)


@register("adamp")
class AdamP(GradkitOptimizer):
    r"""AdamP: Adam whose update is projected off the weight direction when the weight is
    scale-invariant, with decoupled weight decay reduced by ``wd_ratio`` then.

    .. math::
        \begin{aligned}
            &\textbf{for } t = 1, 2, \ldots \textbf{ do} \\
            &\hspace{5mm} g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})
                \ (\text{negated if maximize}) \\
            &\hspace{5mm} m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
                v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
            &\hspace{5mm} d_t \leftarrow \sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon \\
            &\hspace{5mm} u_t \leftarrow m_t / d_t \quad
                (\text{nesterov: } (\beta_1 m_t + (1 - \beta_1) g_t) / d_t) \\
            &\hspace{5mm} (u_t, r) \leftarrow \operatorname{proj}(\theta_{t-1}, g_t, u_t)
                \ \text{if } \theta.\text{ndim} > 1 \text{ else } (u_t, 1) \\
            &\hspace{5mm} \theta_t \leftarrow \theta_{t-1} (1 - \gamma \lambda r)
                - \frac{\gamma}{1 - \beta_1^t} u_t
        \end{aligned}

    The projection :math:`\operatorname{proj}` tests whether the weight looks
    scale-invariant, first per output channel (rows of ``θ.reshape(θ.shape[0], -1)``), then
    for the whole tensor: if every row's :math:`|\cos(g_r, \theta_r)|` is below
    :math:`\delta / \sqrt{\text{row length}}`, it removes from each row of :math:`u_t` its
    component along :math:`\theta_r` and returns :math:`r = \text{wd\_ratio}`; otherwise
    :math:`u_t` is unchanged and :math:`r = 1`. Tensors with ``ndim <= 1`` (biases, norm
    gains) are never projected and get full weight decay.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate :math:`\gamma` (default: 1e-3).
        betas: coefficients :math:`(\beta_1, \beta_2)` of the running averages of the
            gradient and its square (default: (0.9, 0.999)).
        eps: term :math:`\epsilon` added to the denominator; also the floor of the norms in
            the cosine test (default: 1e-8).
        weight_decay: decoupled weight decay :math:`\lambda` (default: 0).
        delta: threshold :math:`\delta` of the cosine test (default: 0.1).
        wd_ratio: weight-decay ratio :math:`r` for projected weights (default: 0.1).
        nesterov: use Nesterov momentum in the update direction (default: False).
        maximize: maximize the objective instead of minimizing (default: False).
        foreach: use the ``torch._foreach_*`` implementation; None picks it on CUDA-class
            devices only, as torch does (default: None).
        fused: use the ``torch.compile``'d implementation; it does not recompile when a
            scheduler changes ``lr`` (default: None).

    Paper: B. Heo, S. Chun, S. J. Oh, D. Han, S. Yun, G. Kim, Y. Uh, J.-W. Ha, "AdamP: Slowing
    Down the Slowdown for Momentum Optimizers on Scale-invariant Weights", ICLR 2021. Matches
    ``adamp/adamp.py`` of clovaai/AdamP (commit 146287b): the test uses the raw gradient and
    is applied to the update; ``eps`` is added after the bias correction of
    :math:`\sqrt{v_t}`. State per parameter: ``step`` (float32 CPU scalar tensor),
    ``exp_avg``, ``exp_avg_sq``.

    Example (a gradient orthogonal to the weight row: the step is projected off it)::

        >>> import torch
        >>> from gradkit.optim import AdamP
        >>> weight = torch.nn.Parameter(torch.tensor([[1.0, 2.0]]))
        >>> opt = AdamP([weight], lr=0.01)
        >>> weight.grad = torch.tensor([[2.0, -1.0]])
        >>> opt.step()
        >>> weight.detach()
        tensor([[0.9880, 2.0060]])
    """

    _name = "AdamP"

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, delta: float = 0.1, wd_ratio: float = 0.1,
                 nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, fused: bool | None = None) -> None:
        check_lr(lr)
        check_betas(betas)
        _check_projection_args(eps, weight_decay, delta, wd_ratio)
        check_impl_flags(foreach, fused, False)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta,
                        wd_ratio=wd_ratio, nesterov=nesterov, maximize=maximize,
                        foreach=foreach, fused=fused)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)

    def _init_group(self, params: list[Tensor]) -> tuple[list[Tensor], ...]:
        steps, exp_avgs, exp_avg_sqs = [], [], []
        for p in params:
            state = self.state[p]
            steps.append(step_counter(state, p))
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
        return steps, exp_avgs, exp_avg_sqs

    def _single_tensor(self, group: dict, params: list[Tensor], grads: list[Tensor],
                       steps: list[Tensor], exp_avgs: list[Tensor],
                       exp_avg_sqs: list[Tensor]) -> None:
        _single_tensor_adamp(params, grads, exp_avgs, exp_avg_sqs, advance_steps(self, params),
                             **_adamp_args(group))

    def _multi_tensor(self, group: dict, params: list[Tensor], grads: list[Tensor],
                      steps: list[Tensor], exp_avgs: list[Tensor],
                      exp_avg_sqs: list[Tensor]) -> None:
        _tiled(_multi_tensor_adamp, group, [params, grads, exp_avgs, exp_avg_sqs],
               advance_steps(self, params), **_adamp_args(group))

    def _fused(self, group: dict, params: list[Tensor], grads: list[Tensor],
               *state: list[Tensor]) -> None:
        _fused_adamp(self, group, params, grads)


def _tiled(update: Callable[..., None], group: dict, tensorlists: list[list[Tensor]],
           steps: list[float], **kwargs: Any) -> None:
    """``update`` one cache-sized slice at a time (:mod:`~gradkit.optim._tiling`). Large weights
    whose projection acts row by row (not projected, or channel-projected: decided first
    from ``p`` and ``g``) are cut into pieces of rows."""
    decided = decide_early(tensorlists[0], tensorlists[1], group["delta"], group["eps"])
    for lists, (part_steps, part_decided) in tiles(tensorlists, [steps, decided],
                                                   [d is not None for d in decided]):
        update(*lists, part_steps, decided=part_decided, **kwargs)


def _adamp_args(group: dict) -> dict[str, Any]:
    beta1, beta2 = group["betas"]
    return dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], delta=group["delta"],
                wd_ratio=group["wd_ratio"], nesterov=group["nesterov"],
                maximize=group["maximize"])


def _single_tensor_adamp(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                         exp_avg_sqs: list[Tensor], steps: list[float], *, lr: float,
                         beta1: float, beta2: float, eps: float, weight_decay: float,
                         delta: float, wd_ratio: float, nesterov: bool,
                         maximize: bool) -> None:
    """``steps``: each tensor's step count ``t`` after this step (as for every path)."""
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        exp_avg, exp_avg_sq, step = exp_avgs[i], exp_avg_sqs[i], steps[i]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        numerator = exp_avg.lerp(grad, 1 - beta1) if nesterov else exp_avg
        update = numerator / denom
        ratio = 1.0
        if param.ndim > 1:
            update, ratio = project(param, grad, update, delta, wd_ratio, eps)
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay * ratio)
        param.add_(update, alpha=-lr / bias_correction1)


def _multi_tensor_adamp(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                        exp_avg_sqs: list[Tensor], steps: list[float], *, lr: float,
                        beta1: float, beta2: float, eps: float, weight_decay: float,
                        delta: float, wd_ratio: float, nesterov: bool, maximize: bool,
                        decided: list[bool | None] | None = None) -> None:
    """``steps``: the step counts after this step; ``decided``: see
    :func:`~gradkit.optim._projection.project_many`. The bias corrections are folded into eps
    and the step size, ``m / (sqrt(v) / c2 + eps) / c1 = (c2 / c1) m / (sqrt(v) + eps c2)``
    with ``c2 = sqrt(1 - β2^t)``, which saves one pass over ``v``."""
    if maximize:
        grads = list(torch._foreach_neg(grads))
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    root_bc2 = [math.sqrt(1 - beta2**s) for s in steps]
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denoms, [eps * c for c in root_bc2])
    numerators = torch._foreach_lerp(exp_avgs, grads, 1 - beta1) if nesterov else exp_avgs
    updates = list(torch._foreach_div(numerators, denoms))
    passed = project_many(params, grads, updates, delta, eps, decided)
    _decay_(params, passed, *_decay_factors(lr, weight_decay, wd_ratio))
    _add_steps_(params, updates, [-lr * c / (1 - beta1**s) for s, c in zip(steps, root_bc2)])


def _add_steps_(params: list[Tensor], updates: list[Tensor], sizes: list[float]) -> None:
    """``p_i += sizes[i] * u_i`` with foreach ops."""
    if len(set(sizes)) == 1:
        torch._foreach_add_(params, updates, alpha=sizes[0])
    else:
        torch._foreach_mul_(updates, sizes)
        torch._foreach_add_(params, updates)


class _AdamPScalars(NamedTuple):
    sign: float  # -1 when maximizing
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    inv_root_bc2: float  # 1 / sqrt(1 - β2^t): a multiplication instead of a division
    eps: float
    neg_step: float  # -lr / (1 - β1^t)
    delta_sq: float
    decay: float  # 1 - lr wd
    decay_projected: float  # 1 - lr wd wd_ratio


def _fused_adamp(opt: torch.optim.Optimizer, group: dict, params: list[Tensor],
                 grads: list[Tensor]) -> None:
    """:func:`_adamp_kernel` over the params (one device and dtype), once per step count, with
    the hyperparameters as a tensor (:func:`~gradkit.optim._fused.scalars`): changing ``lr``
    does not recompile."""
    lr, (beta1, beta2) = float(group["lr"]), group["betas"]
    plain, projected = _decay_factors(lr, group["weight_decay"], group["wd_ratio"])
    for step, idx in indices_by_value(advance_steps(opt, params)).items():
        s = scalars(_AdamPScalars(
            -1.0 if group["maximize"] else 1.0, 1 - beta1, beta2, 1 - beta2,
            1 / math.sqrt(1 - beta2**step), group["eps"], -lr / (1 - beta1**step),
            group["delta"] ** 2, plain, projected), params[0])
        apply_rows(opt, _adamp_kernel, params, grads, ("exp_avg", "exp_avg_sq"), s,
                   group["nesterov"], indices=idx)


def _project_and_step(p: Tensor, g: Tensor, direction: Callable[[], Tensor], eps: Tensor,
                      delta_sq: Tensor, plain: Tensor, projected: Tensor, neg_step: Tensor,
                      rows: bool) -> Tensor:
    """Kernel tail shared by AdamP and SGDP (tensors are ``(N, C, D)``); returns final ``u``.

    ``direction()`` builds the unprojected update elementwise from the (old) state. It is
    traced twice, inside the row reductions and in the update pass, so inductor recomputes it
    in each pass instead of storing it: one reduction pass reading ``p, g`` and the state, then
    one elementwise pass that updates ``p`` and the state.
    """
    if not rows:
        u = direction()
        p.copy_(p * plain + neg_step * u)
        return u
    coef, ok = coefficients(p, g, direction(), delta_sq, eps)
    factor = torch.where(ok, projected, plain).view(-1, 1, 1)
    u = direction() - p * coef
    p.copy_(p * factor + neg_step * u)
    return u


def _adamp_kernel(p: Tensor, g: Tensor, m: Tensor, v: Tensor, s: Tensor, nesterov: bool,
                  *, rows: bool) -> None:
    """One AdamP step of ``(N, C, D)`` tensors, in place; ``rows=False``: never projected
    (flat pack of 1-D tensors). Compiled by :func:`~gradkit.optim._packed.apply_rows`."""
    h = fields(_AdamPScalars, s)
    g = g * h.sign

    def moments() -> tuple[Tensor, Tensor]:
        return m + (g - m) * h.one_minus_beta1, v * h.beta2 + g * g * h.one_minus_beta2

    def direction() -> Tensor:
        m_new, v_new = moments()
        num = m_new + (g - m_new) * h.one_minus_beta1 if nesterov else m_new
        return num / (v_new.sqrt() * h.inv_root_bc2 + h.eps)

    _project_and_step(p, g, direction, h.eps, h.delta_sq, h.decay, h.decay_projected,
                      h.neg_step, rows)
    m_new, v_new = moments()
    m.copy_(m_new)
    v.copy_(v_new)


@register("sgdp")
class SGDP(GradkitOptimizer):
    r"""SGDP: SGD with momentum whose update is projected off the weight direction when the
    weight is scale-invariant, with decoupled weight decay reduced by ``wd_ratio`` then.

    .. math::
        \begin{aligned}
            &\textbf{for } t = 1, 2, \ldots \textbf{ do} \quad (b_0 = 0) \\
            &\hspace{5mm} g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})
                \ (\text{negated if maximize}) \\
            &\hspace{5mm} b_t \leftarrow \mu b_{t-1} + (1 - \tau) g_t \\
            &\hspace{5mm} d_t \leftarrow g_t + \mu b_t \text{ if nesterov else } b_t \\
            &\hspace{5mm} (d_t, r) \leftarrow \operatorname{proj}(\theta_{t-1}, g_t, d_t)
                \ \text{if } \theta.\text{ndim} > 1 \text{ else } (d_t, 1) \\
            &\hspace{5mm} \text{if not nesterov: } b_t \leftarrow d_t \\
            &\hspace{5mm} \theta_t \leftarrow \theta_{t-1}
                \Big(1 - \frac{\gamma \lambda r}{1 - \mu}\Big) - \gamma d_t
        \end{aligned}

    :math:`\operatorname{proj}` is :class:`AdamP`'s projection (channel view first, then the
    whole tensor; ``ndim <= 1`` tensors are never projected).

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate :math:`\gamma`; required, but may be given per parameter group
            only, as with ``torch.optim.SGD``.
        momentum: momentum factor :math:`\mu` (default: 0).
        dampening: dampening :math:`\tau` of the momentum (default: 0).
        weight_decay: decoupled weight decay :math:`\lambda` (default: 0).
        nesterov: use Nesterov momentum; requires ``momentum > 0`` and ``dampening = 0``
            (default: False).
        eps: floor of the norms in the cosine test and the projection (default: 1e-8).
        delta: threshold :math:`\delta` of the cosine test (default: 0.1).
        wd_ratio: weight-decay ratio :math:`r` for projected weights (default: 0.1).
        maximize: maximize the objective instead of minimizing (default: False).
        foreach: use the ``torch._foreach_*`` implementation; None picks it on CUDA-class
            devices only, as torch does (default: None).
        fused: use the ``torch.compile``'d implementation; it does not recompile when a
            scheduler changes ``lr`` (default: None).

    Paper: Heo et al., ICLR 2021 (see :class:`AdamP`). Matches ``adamp/sgdp.py`` of
    clovaai/AdamP (commit 146287b). Unlike ``torch.optim.SGD`` the momentum buffer starts at
    zero (the first step is :math:`(1 - \tau) g_1`) and exists even with ``momentum=0``;
    note the :math:`1/(1-\mu)` decay factor. Choice: as in the authors' code (which projects
    the buffer in place), without nesterov a projected step also stores the projected
    direction as the momentum buffer; the paper's algorithm keeps the unprojected buffer.
    State per parameter: ``momentum_buffer``.

    Example (the radial part of the step is removed; plain SGD would give ``[[0.999, -0.1]]``)::

        >>> import torch
        >>> from gradkit.optim import SGDP
        >>> weight = torch.nn.Parameter(torch.tensor([[1.0, 0.0]]))
        >>> opt = SGDP([{"params": [weight], "lr": 0.1}])
        >>> weight.grad = torch.tensor([[0.01, 1.0]])
        >>> opt.step()
        >>> weight.detach()
        tensor([[ 1.0000, -0.1000]])
    """

    _name = "SGDP"

    def __init__(self, params: Iterable[Any], lr: float | Tensor = required,
                 momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, eps: float = 1e-8, delta: float = 0.1,
                 wd_ratio: float = 0.1, *, maximize: bool = False,
                 foreach: bool | None = None, fused: bool | None = None) -> None:
        if lr is not required:
            check_lr(lr)
        check_in_interval("momentum", momentum, 0.0, 1.0)
        check_in_interval("dampening", dampening, 0.0, 1.0, closed_high=True)
        _check_projection_args(eps, weight_decay, delta, wd_ratio)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        check_impl_flags(foreach, fused, False)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, eps=eps, delta=delta,
                        wd_ratio=wd_ratio, maximize=maximize, foreach=foreach, fused=fused)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)

    def _init_group(self, params: list[Tensor]) -> tuple[list[Tensor], ...]:
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(
                    p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        return (bufs,)

    def _single_tensor(self, group: dict, params: list[Tensor], grads: list[Tensor],
                       bufs: list[Tensor]) -> None:
        _single_tensor_sgdp(params, grads, bufs, **_sgdp_args(group))

    def _multi_tensor(self, group: dict, params: list[Tensor], grads: list[Tensor],
                      bufs: list[Tensor]) -> None:
        _tiled(_multi_tensor_sgdp, group, [params, grads, bufs], [0.0] * len(params),
               **_sgdp_args(group))

    def _fused(self, group: dict, params: list[Tensor], grads: list[Tensor],
               bufs: list[Tensor]) -> None:
        _fused_sgdp(self, group, params, grads)


def _sgdp_args(group: dict) -> dict[str, Any]:
    return dict(lr=float(group["lr"]), momentum=group["momentum"],
                dampening=group["dampening"], weight_decay=group["weight_decay"],
                nesterov=group["nesterov"], eps=group["eps"], delta=group["delta"],
                wd_ratio=group["wd_ratio"], maximize=group["maximize"])


def _single_tensor_sgdp(params: list[Tensor], grads: list[Tensor],
                        momentum_buffers: list[Tensor], *, lr: float, momentum: float,
                        dampening: float, weight_decay: float, nesterov: bool, eps: float,
                        delta: float, wd_ratio: float, maximize: bool) -> None:
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        buf = momentum_buffers[i]
        buf.mul_(momentum).add_(grad, alpha=1 - dampening)
        update = grad.add(buf, alpha=momentum) if nesterov else buf
        ratio = 1.0
        if param.ndim > 1:
            update, ratio = project(param, grad, update, delta, wd_ratio, eps)
            if not nesterov and update is not buf:
                buf.copy_(update)  # the reference projects its buffer in place
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay * ratio / (1 - momentum))
        param.add_(update, alpha=-lr)


def _multi_tensor_sgdp(params: list[Tensor], grads: list[Tensor],
                       momentum_buffers: list[Tensor], steps: list[float], *, lr: float,
                       momentum: float, dampening: float, weight_decay: float,
                       nesterov: bool, eps: float, delta: float, wd_ratio: float,
                       maximize: bool, decided: list[bool | None] | None = None) -> None:
    """``steps``: unused (SGDP keeps no step count); ``decided``: see
    :func:`~gradkit.optim._projection.project_many`."""
    if maximize:
        grads = list(torch._foreach_neg(grads))
    torch._foreach_mul_(momentum_buffers, momentum)
    torch._foreach_add_(momentum_buffers, grads, alpha=1 - dampening)
    # without nesterov the update IS the buffer, projected in place as in the reference
    updates = (list(torch._foreach_add(grads, momentum_buffers, alpha=momentum)) if nesterov
               else momentum_buffers)
    passed = project_many(params, grads, updates, delta, eps, decided)
    _decay_(params, passed, *_decay_factors(lr, weight_decay, wd_ratio, 1 / (1 - momentum)))
    torch._foreach_add_(params, updates, alpha=-lr)


class _SGDPScalars(NamedTuple):
    sign: float  # -1 when maximizing
    momentum: float
    one_minus_dampening: float
    eps: float
    delta_sq: float
    decay: float  # 1 - lr wd / (1 - μ)
    decay_projected: float  # 1 - lr wd wd_ratio / (1 - μ)
    neg_lr: float


def _fused_sgdp(opt: torch.optim.Optimizer, group: dict, params: list[Tensor],
                grads: list[Tensor]) -> None:
    """:func:`_sgdp_kernel` over the params (see :func:`_fused_adamp`)."""
    lr, mu = float(group["lr"]), group["momentum"]
    s = scalars(_SGDPScalars(
        -1.0 if group["maximize"] else 1.0, mu, 1 - group["dampening"], group["eps"],
        group["delta"] ** 2, *_decay_factors(lr, group["weight_decay"], group["wd_ratio"],
                                             1 / (1 - mu)), -lr), params[0])
    apply_rows(opt, _sgdp_kernel, params, grads, ("momentum_buffer",), s, group["nesterov"])


def _sgdp_kernel(p: Tensor, g: Tensor, buf: Tensor, s: Tensor, nesterov: bool, *,
                 rows: bool) -> None:
    """One SGDP step of ``(N, C, D)`` tensors, in place (see :func:`_adamp_kernel`)."""
    h = fields(_SGDPScalars, s)
    g = g * h.sign

    def momentum() -> Tensor:
        return buf * h.momentum + g * h.one_minus_dampening

    def direction() -> Tensor:
        return g + momentum() * h.momentum if nesterov else momentum()

    d = _project_and_step(p, g, direction, h.eps, h.delta_sq, h.decay, h.decay_projected,
                          h.neg_lr, rows)
    buf.copy_(momentum() if nesterov else d)  # the reference projects the buffer in place
