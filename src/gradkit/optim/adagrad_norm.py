"""AdaGrad-Norm: AdaGrad with one scalar step size per parameter group."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from gradkit._checks import check_eps, check_impl_flags, check_lr, check_non_negative
from gradkit.optim._base import (
    GradkitOptimizer,
    add_l2_decay,
    evaluate_closure,
    group_gradients,
    step_counter,
)
from gradkit.optim._registry import register


def scalar_lr(lr: float | Tensor) -> float | Tensor:
    """A 1-element Tensor lr of any shape as a 0-d tensor (torch squeezes it the same way in
    ``step``), so it broadcasts like a number; floats pass through."""
    return lr.squeeze() if isinstance(lr, Tensor) and lr.dim() != 0 else lr


@register("adagradnorm")
class AdaGradNorm(GradkitOptimizer):
    r"""AdaGrad-Norm (scalar AdaGrad step size, Ward, Wu & Bottou form).

    .. math::
        \begin{aligned}
            &g_k \leftarrow \nabla f(x_k) \ (+\ \lambda x_k \text{ if weight\_decay})\\
            &b_{k+1}^2 \leftarrow b_k^2 + \lVert g_k \rVert^2
                \qquad (b_0^2 = \texttt{initial\_accumulator\_value})\\
            &x_{k+1} \leftarrow x_k - \alpha\, g_k / (b_{k+1} + \epsilon)
        \end{aligned}

    ``||g_k||`` is the norm of the gradient of **all parameters of the group** that have a
    gradient, so one scalar ``b`` per param group; put the whole model in one group for the
    paper's global form (the default when you pass ``model.parameters()``). ``eps`` only
    guards ``b = 0`` (with ``b_0 = 0`` the first step has ``b_1 = ||g_0||``, a step of length
    ``α`` along ``-g_0/||g_0||``).

    Papers: R. Ward, X. Wu, L. Bottou, "AdaGrad stepsizes: sharp convergence over nonconvex
    landscapes" (ICML 2019); used as AdAdaGrad-Norm in T. Lau, H. Liu, M. Kolar, "AdAdaGrad:
    Adaptive Batch Size Schemes for Adaptive Gradient Methods" (2024). Note: the
    ``timlautk/AdAdaGrad`` repository's ``Adagradnorm`` class is a different, row-wise variant
    (one accumulator per output row of 2-D/4-D weights, momentum, and a weight-decay line
    that subtracts ``lr·wd·grad``); this class implements the textbook scalar version.

    State (per parameter, torch-style and lazy): ``step`` and ``sum`` (torch Adagrad's key
    name), a 0-d copy of the group accumulator b² as of the last step in which the parameter
    had a gradient. b² never decreases, so the group's current b² is the largest stored copy;
    parameters whose gradient is None are skipped and keep their stale copy.

    Example (the first step has length α along ``-g/||g||``)::

        >>> import torch
        >>> from gradkit.optim import AdaGradNorm
        >>> x = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> opt = AdaGradNorm([x], lr=1.0)
        >>> x.grad = torch.tensor([3.0, 4.0])
        >>> opt.step()  # b_1 = ||g|| = 5, x <- x - g / 5
        >>> x.detach()
        tensor([0.4000, 1.2000])
        >>> opt.state[x]["sum"].item()
        25.0

    Args:
        params: iterable of parameters or named_parameters to optimize, or dicts defining
            parameter groups.
        lr (float, Tensor, optional): step size :math:`\alpha`; a float or a 1-element
            Tensor (default: 1e-2, torch Adagrad's).
        initial_accumulator_value: :math:`b_0^2` (default: 0).
        eps: term :math:`\epsilon` added to :math:`b` (default: 1e-10, as torch Adagrad).
        weight_decay: L2 penalty :math:`\lambda`, added to the gradient (default: 0).
        maximize: maximize the objective instead of minimizing (default: False).
        foreach: use the ``torch._foreach_*`` implementation; None picks it on CUDA-class
            devices only, as torch does (default: None).
        fused: accepted for torch's signature; True raises, there is no fused
            implementation (default: None).
    """

    _name = "AdaGradNorm"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-2,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        check_impl_flags(foreach, fused, False)
        if fused:
            raise RuntimeError("AdaGradNorm has no fused implementation; use foreach=True or "
                               "the default loop")
        check_lr(lr)
        check_non_negative("initial_accumulator_value", initial_accumulator_value)
        check_eps(eps)
        check_non_negative("weight_decay", weight_decay)
        defaults = dict(lr=lr, initial_accumulator_value=initial_accumulator_value, eps=eps,
                        weight_decay=weight_decay, maximize=maximize, foreach=foreach,
                        fused=fused)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        # one accumulator per group: the base class's per-(device, dtype) split does not fit
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            params, grads, foreach = group_gradients(self._name, group)
            if not params:
                continue
            grads = add_l2_decay(grads, params, group["weight_decay"], foreach)
            sums = []
            for p in params:
                state = self.state[p]
                if "sum" not in state:
                    state["sum"] = torch.full((), group["initial_accumulator_value"],
                                              dtype=p.dtype, device=p.device)
                step_counter(state, p).add_(1)
                sums.append(state["sum"])
            anchor = sums[0]
            # b² never decreases, so the group's current b² is the largest stored copy
            stored = [self.state[p]["sum"] for p in group["params"]
                      if p in self.state and "sum" in self.state[p]]
            previous = torch.stack([t.to(anchor.device, anchor.dtype) for t in stored]).max()
            if foreach:
                norms = torch._foreach_norm(grads)
            else:
                norms = [torch.linalg.vector_norm(g) for g in grads]
            squared = torch.stack([n.to(anchor.device, anchor.dtype) for n in norms])
            accumulator = previous + squared.square().sum()
            for t in sums:
                t.copy_(accumulator)
            coef = scalar_lr(group["lr"]) / (accumulator.sqrt() + group["eps"])
            if foreach:
                torch._foreach_sub_(params, torch._foreach_mul(grads, coef))
            else:
                for p, g in zip(params, grads):
                    p.sub_(g * coef.to(p.device))
        return loss
