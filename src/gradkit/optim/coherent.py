"""Coherence-robust gradient descent (Chatterjee & Zielinski): M3, RM3, RA3, winsorized GD.

All of them suppress "weak" gradient directions (supported by few examples) by a robust
aggregate: the coordinate-wise median of three mini-batch gradients (M3 / RM3), the mean of
three (RA3, the control), or per-coordinate winsorization of per-example gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import required

from gradkit._checks import check_lr, check_non_negative
from gradkit.autodiff.per_example import per_example_grads
from gradkit.optim._base import (
    add_l2_decay,
    evaluate_closure,
    group_gradients,
    step_counter,
    tensor_steps,
)
from gradkit.optim._registry import register
from gradkit.optim.adagrad_norm import scalar_lr

_BUFFER = 3


def median_of_three(h1: list[Tensor], h2: list[Tensor], h3: list[Tensor], *,
                    foreach: bool = False) -> list[Tensor]:
    """Coordinate-wise median as ``h1 + h2 + h3 − min − max`` (the reference's formula)."""
    if foreach:
        total = torch._foreach_add(torch._foreach_add(h1, h2), h3)
        low = torch._foreach_minimum(torch._foreach_minimum(h1, h2), h3)
        high = torch._foreach_maximum(torch._foreach_maximum(h1, h2), h3)
        torch._foreach_sub_(total, low)
        torch._foreach_sub_(total, high)
        return list(total)
    out = []
    for a, b, c in zip(h1, h2, h3):
        low = torch.minimum(torch.minimum(a, b), c)
        high = torch.maximum(torch.maximum(a, b), c)
        out.append(a + b + c - low - high)
    return out


def mean_of_three(h1: list[Tensor], h2: list[Tensor], h3: list[Tensor], *,
                  foreach: bool = False) -> list[Tensor]:
    if foreach:
        total = torch._foreach_add(torch._foreach_add(h1, h2), h3)
        torch._foreach_div_(total, 3.0)
        return list(total)
    return [(a + b + c) / 3.0 for a, b, c in zip(h1, h2, h3)]


class _ThreeBatchGD(torch.optim.Optimizer):
    """Shared machinery: a ring buffer of the last three (decayed) mini-batch gradients."""

    _name = "ThreeBatchGD"
    _running = False
    _aggregate = staticmethod(median_of_three)

    def __init__(self, params: Iterable[Any], lr: float | Tensor = required,
                 weight_decay: float = 0.0, *, maximize: bool = False,
                 foreach: bool | None = None) -> None:
        if lr is not required:
            check_lr(lr)
        check_non_negative("weight_decay", weight_decay)
        defaults = dict(lr=lr, weight_decay=weight_decay, maximize=maximize, foreach=foreach)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # torch raises for a group without lr when there is no top-level lr (``required``)
        super().add_param_group(param_group)
        check_lr(self.param_groups[-1]["lr"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
        tensor_steps(self)

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            params, grads, foreach = group_gradients(self._name, group)
            if not params:
                continue
            grads = add_l2_decay(grads, params, group["weight_decay"], foreach)
            ready_params, slots = [], ([], [], [])
            for p, g in zip(params, grads):
                state = self.state[p]
                if "grad_buffer" not in state:  # reference quirk: three copies of g_1
                    state["grad_buffer"] = g.detach().unsqueeze(0).repeat(
                        _BUFFER, *([1] * g.ndim)).contiguous()
                step = step_counter(state, p)
                index = int(step.item()) % _BUFFER
                step.add_(1)
                buffer = state["grad_buffer"]
                buffer[index].copy_(g)
                count = int(step.item())
                if count >= _BUFFER and (self._running or count % _BUFFER == 0):
                    ready_params.append(p)
                    for slot, row in zip(slots, buffer.unbind(0)):
                        slot.append(row)
            if ready_params:
                direction = self._aggregate(*slots, foreach=foreach)
                lr = scalar_lr(group["lr"])
                if foreach:
                    torch._foreach_add_(ready_params, direction, alpha=-lr)
                else:
                    for p, d in zip(ready_params, direction):
                        p.add_(d, alpha=-lr)
        return loss


_DOC_COMMON = r"""
    Paper: P. Zielinski, S. Krishnan, S. Chatterjee, "Weak and Strong Gradient Directions:
    Explaining Memorization, Generalization, and Hardness of Examples at Scale" (arXiv
    2003.07422); see also Chatterjee & Zielinski, "On the Generalization Mystery in Deep
    Learning" (arXiv 2203.10036). Reference matched:
    ``google-research/coherent_gradients/weak_and_strong/optimizers`` (``m3.py``, ``rm3.py``,
    ``ra3.py``): L2 decay ``g + λθ`` is added to each mini-batch gradient before it enters the
    buffer; the buffer is initialised with three copies of the first gradient (reference
    quirk; because the first update happens at step 3, the copies are always overwritten
    before they are used); the median is ``h1 + h2 + h3 − min − max`` as in the reference
    (exact in exact arithmetic; in floating point it can differ from the middle value by a
    rounding error when the three values differ widely in magnitude). The reference
    ``m3.py`` / ``ra3.py`` read an undefined attribute (``self.RINGBUFFER_SIZE``) and fail at
    their first step; that bug is not reproduced — they behave as intended here.

    Example (gradients 1, 8, 3, 4 in turn: M3 steps on the median of the first triple, 3;
    RA3 on its mean, 4; RM3 on the running median, 3 and then median(4, 8, 3) = 4)::

        >>> import torch
        >>> from gradkit.optim import M3, RA3, RM3
        >>> for cls in (M3, RM3, RA3):
        ...     x = torch.nn.Parameter(torch.zeros(1))
        ...     opt = cls([x], lr=1.0)
        ...     path = []
        ...     for g in (1.0, 8.0, 3.0, 4.0):
        ...         x.grad = torch.tensor([g])
        ...         opt.step()
        ...         path.append(x.item())
        ...     print(cls.__name__, path)
        M3 [0.0, 0.0, -3.0, -3.0]
        RM3 [0.0, 0.0, -3.0, -7.0]
        RA3 [0.0, 0.0, -4.0, -4.0]

    State: ``grad_buffer`` (3 × the parameter, slot ``(t−1) mod 3`` holds ``g_t``) and
    ``step``. Each step's gradient must be a fresh mini-batch gradient.

    Args:
        params: iterable of parameters or named_parameters to optimize, or dicts defining
            parameter groups.
        lr (float, Tensor): learning rate :math:`\gamma`; required, at the top level or in
            every parameter group.
        weight_decay: L2 penalty :math:`\lambda`, added to each gradient before it is
            buffered (default: 0).
        maximize: maximize the objective instead of minimizing (default: False).
        foreach: use the ``torch._foreach_*`` implementation; None picks it on CUDA-class
            devices only, as torch does (default: None).
"""


@register("m3")
class M3(_ThreeBatchGD):
    __doc__ = r"""M3: coordinate-wise median of three disjoint mini-batch gradients, every 3rd step.

    .. math::
        \begin{aligned}
            &h_t \leftarrow g_t + \lambda\theta_{t-1} \ \text{stored in slot } (t-1) \bmod 3\\
            &\textbf{if } t \equiv 0 \pmod 3:\ \theta_t \leftarrow \theta_{t-1}
                - \gamma\,\mathrm{median}(h_{t-2}, h_{t-1}, h_t)
                \quad (\text{else } \theta_t = \theta_{t-1})
        \end{aligned}

    """ + _DOC_COMMON

    _name = "M3"


@register("rm3")
class RM3(_ThreeBatchGD):
    __doc__ = r"""RM3 (running M3): median of the last three mini-batch gradients, each step from 3.

    .. math::
        \begin{aligned}
            &h_t \leftarrow g_t + \lambda\theta_{t-1} \ \text{stored in slot } (t-1) \bmod 3\\
            &\textbf{if } t \geq 3:\ \theta_t \leftarrow \theta_{t-1}
                - \gamma\,\mathrm{median}(h_{t-2}, h_{t-1}, h_t)
        \end{aligned}

    The sequence is median(g1, g2, g3) at step 3, median(g4, g2, g3) at step 4, ...

    """ + _DOC_COMMON

    _name = "RM3"
    _running = True


@register("ra3")
class RA3(_ThreeBatchGD):
    __doc__ = r"""RA3 (control for M3): mean of three disjoint mini-batch gradients, every 3rd step.

    .. math::
        \begin{aligned}
            &\textbf{if } t \equiv 0 \pmod 3:\ \theta_t \leftarrow \theta_{t-1}
                - \gamma\,(h_{t-2} + h_{t-1} + h_t)/3
        \end{aligned}

    Choice: the reference ``ra3.py`` shares ``m3.py``'s structure, so RA3 updates on disjoint
    triples like M3 (a plain SGD with 3× batch and 1/3 of the steps).

    """ + _DOC_COMMON

    _name = "RA3"
    _aggregate = staticmethod(mean_of_three)


# ----------------------------------------------------------------------- winsorization
def _nearest_rank(q: float, n: int) -> int:
    """numpy ``percentile(method="nearest")`` index: round ``q(n−1)`` half to even."""
    return round(q * (n - 1))


def winsorized_gradient(per_example: Tensor, c: float = 10.0) -> Tensor:
    r"""Per-coordinate winsorized sum over examples (dimension 0).

    .. math::
        \mathrm{lo}_j, \mathrm{hi}_j = \text{percentiles } c,\ 100-c \text{ of }
        \{g_{i,j}\}_i \ (\text{"nearest"}), \qquad
        u_j = \sum_i \mathrm{clip}(g_{i,j}, \mathrm{lo}_j, \mathrm{hi}_j)

    Paper: S. Chatterjee, "Coherent Gradients: An Approach to Understanding Generalization in
    Gradient Descent-based Optimization" (ICLR 2020). Reference:
    ``coherent_gradients/iclr_2020_paper/utils.py`` (``winsorize_sum`` policy,
    default c = 10 %), where each per-example gradient already carries the 1/m of a mean
    loss, so the sum is the winsorized mean gradient. ``c = 0`` gives the plain sum.

    Args:
        per_example: tensor ``(m, *shape)`` of per-example gradients.
        c: percentage clipped at each end, in ``[0, 50]``.
    """
    if not 0.0 <= c <= 50.0:
        raise ValueError(f"Invalid c value: {c} (a percentage in [0, 50])")
    m = per_example.shape[0]
    if m == 0:
        raise ValueError("winsorized_gradient needs at least one example")
    lo_rank, hi_rank = _nearest_rank(c / 100.0, m), _nearest_rank(1.0 - c / 100.0, m)
    lo = torch.kthvalue(per_example, lo_rank + 1, dim=0).values
    hi = torch.kthvalue(per_example, hi_rank + 1, dim=0).values
    return torch.clamp(per_example, lo, hi).sum(0)


def winsorized_grads(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    c: float = 10.0,
    set_grad: bool = True,
    **per_example_kwargs: Any,
) -> dict[str, Tensor]:
    """Winsorized mini-batch gradient of ``model`` (optionally written to ``p.grad``).

    Per-example gradients come from :func:`gradkit.autodiff.per_example_grads`; each is
    divided by the batch size m (the per-example share of a mean loss) and winsorized with
    :func:`winsorized_gradient`. With ``set_grad=True`` the result replaces ``p.grad``, so
    winsorized GD is ``winsorized_grads(...)`` followed by ``torch.optim.SGD(...).step()``::

        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in loader:
            winsorized_grads(model, F.cross_entropy, x, y, c=10)
            opt.step()

    Returns:
        ``{parameter name: winsorized gradient}``.
    """
    grads = per_example_grads(model, loss_fn, inputs, targets, **per_example_kwargs)
    m = inputs.shape[0]
    out = {name: winsorized_gradient(g / m, c) for name, g in grads.items()}
    if set_grad:
        named = dict(model.named_parameters())
        for name, g in out.items():
            named[name].grad = g.to(named[name].dtype)
    return out
