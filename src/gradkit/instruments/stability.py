r"""Sharpness, Hessian trace and the stability thresholds they are compared with.

Thresholds (a quadratic :math:`\tfrac12\lambda x^2` diverges iff its curvature exceeds them):

.. math::
    \begin{aligned}
    \text{GD:}\quad & \lambda < 2/\eta \quad\text{(Cohen et al., ICLR 2021)} \\
    \text{heavy ball } (\beta):\quad & \lambda < (2+2\beta)/\eta \\
    \text{Nesterov } (\beta):\quad & \lambda < (2+2\beta)/((1+2\beta)\,\eta) \\
    \text{Adam, frozen } P:\quad & \lambda_{\max}(P^{-1/2} H P^{-1/2})
        < (2+2\beta_1)/((1-\beta_1)\,\eta) \quad\text{(Cohen et al., arXiv 2207.14484)}
    \end{aligned}

For torch's SGD, dampening ``d`` scales the step by ``1 − d`` (threshold divided by
``1 − d``) and coupled ``weight_decay`` adds ``wd·I`` to the Hessian (threshold on the loss
Hessian lowered by ``wd``). Adam's preconditioner is read as ``P = diag(√v̂ + ε)`` with
``v̂ = v/(1 − β₂^t)`` from the optimizer state: our reading of the paper, NOT verified
against the authors' code. AdamW's decoupled decay is ignored (it does not enter ``P⁻¹H``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn


def _check_lr(lr: float) -> None:
    if not lr > 0:
        raise ValueError(f"Invalid learning rate: {lr} (thresholds need lr > 0)")


def gd_threshold(lr: float) -> float:
    """``2/η``: GD on a quadratic diverges iff the curvature exceeds it.

    Args:
        lr: the learning rate η.

    Example::

        >>> from gradkit.instruments import gd_threshold
        >>> gd_threshold(0.1)
        20.0
    """
    _check_lr(lr)
    return 2.0 / lr


def heavy_ball_threshold(lr: float, momentum: float, *, nesterov: bool = False,
                         dampening: float = 0.0) -> float:
    """``(2+2β)/η`` for heavy ball (torch SGD form ``b ← βb + (1−d)g, θ ← θ − ηb``);
    ``(2+2β)/((1+2β)η)`` with ``nesterov=True`` (``θ ← θ − η(g + βb)``); both ÷ ``(1−d)``.

    Args:
        lr: the learning rate η.
        momentum: β in [0, 1).
        nesterov: Nesterov momentum.
        dampening: d in [0, 1).

    Example::

        >>> from gradkit.instruments import heavy_ball_threshold
        >>> heavy_ball_threshold(0.5, 0.5)  # (2 + 1) / 0.5
        6.0
    """
    _check_lr(lr)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if not 0.0 <= dampening < 1.0:
        raise ValueError(f"Invalid dampening value: {dampening}")
    thr = (2.0 + 2.0 * momentum) / lr
    if nesterov:
        thr /= 1.0 + 2.0 * momentum
    return thr / (1.0 - dampening)


def adam_threshold(lr: float, beta1: float) -> float:
    """``(2+2β₁)/((1−β₁)η)`` (38/η at β₁ = 0.9) for the preconditioned sharpness.

    Args:
        lr: the learning rate η.
        beta1: Adam's β₁ in [0, 1).

    Example::

        >>> from gradkit.instruments import adam_threshold
        >>> round(adam_threshold(0.01, 0.9), 6)
        3800.0
    """
    _check_lr(lr)
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
    return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)


class Threshold(NamedTuple):
    kind: str  #: "gd", "heavy_ball", "nesterov" or "adam"
    value: float  #: the threshold
    lr: float


def _group(optimizer: torch.optim.Optimizer, keys: Sequence[str]) -> dict[str, Any]:
    groups = optimizer.param_groups
    first = {k: groups[0].get(k) for k in keys}
    for g in groups[1:]:
        if any(g.get(k) != first[k] for k in keys):
            raise ValueError(
                f"param groups disagree on {list(keys)}: the stability threshold is defined "
                "for one learning rate; compute it per group with gd_threshold/"
                "heavy_ball_threshold/adam_threshold"
            )
    return first


def stability_threshold(optimizer: torch.optim.Optimizer) -> Threshold | None:
    """The stability threshold of ``optimizer``, read live from its ``param_groups`` (so lr
    schedules are followed).

    torch ``SGD`` (GD, heavy ball or Nesterov; dampening and coupled weight decay included:
    the threshold on the loss Hessian is lowered by ``weight_decay``) and ``Adam``/``AdamW``
    (the preconditioned threshold). ``None`` for other optimizers (their stability limit is
    not known in closed form). Param groups with different learning rates raise
    ``ValueError``.

    Args:
        optimizer: the optimizer.

    Example::

        >>> import torch
        >>> from gradkit.instruments import stability_threshold
        >>> params = torch.nn.Linear(2, 1).parameters()
        >>> stability_threshold(torch.optim.SGD(params, lr=0.5, momentum=0.5))
        Threshold(kind='heavy_ball', value=6.0, lr=0.5)
    """
    if isinstance(optimizer, torch.optim.SGD):
        g = _group(optimizer, ("lr", "momentum", "nesterov", "dampening", "weight_decay"))
        lr, mom, wd = float(g["lr"]), float(g["momentum"] or 0.0), float(g["weight_decay"] or 0)
        if mom == 0:
            return Threshold("gd", gd_threshold(lr) - wd, lr)
        thr = heavy_ball_threshold(lr, mom, nesterov=bool(g["nesterov"]),
                                   dampening=float(g["dampening"] or 0.0))
        return Threshold("nesterov" if g["nesterov"] else "heavy_ball", thr - wd, lr)
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        g = _group(optimizer, ("lr", "betas"))
        return Threshold("adam", adam_threshold(float(g["lr"]), float(g["betas"][0])),
                         float(g["lr"]))
    return None


def optimizer_lr(optimizer: torch.optim.Optimizer) -> float:
    """The (single) learning rate of ``optimizer``."""
    return float(_group(optimizer, ("lr",))["lr"])


def adam_preconditioner_sqrt_inv(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]
                                 ) -> Tensor:
    r"""``d = 1/\sqrt{\sqrt{\hat v} + \varepsilon}`` flattened over ``params`` (in order), so
    that ``diag(d)·H·diag(d) = P^{-1/2} H P^{-1/2}`` with ``P = diag(√v̂ + ε)``.

    ``v̂ = v / (1 − β₂^t)`` from ``exp_avg_sq`` (``max_exp_avg_sq`` under AMSGrad) and ``step``
    of the Adam/AdamW state: torch's own denominator ``√v/√(1−β₂^t) + ε``.

    Args:
        optimizer: an ``Adam`` or ``AdamW`` that has taken at least one step.
        params: the parameters (owned by ``optimizer``) to flatten, in order.

    Example::

        >>> import torch
        >>> from gradkit.instruments import adam_preconditioner_sqrt_inv
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = torch.optim.Adam([w], lr=0.1, eps=0.0)
        >>> w.grad = torch.tensor([4.0, 0.25])
        >>> opt.step()
        >>> adam_preconditioner_sqrt_inv(opt, [w])  # 1/sqrt(|g|) after one step
        tensor([0.5000, 2.0000])
    """
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        raise TypeError(
            f"the preconditioned sharpness reads Adam/AdamW state; got {type(optimizer).__name__}"
        )
    g = _group(optimizer, ("betas", "eps", "amsgrad"))
    beta2, eps = float(g["betas"][1]), float(g["eps"])
    chunks = []
    for p in params:
        state = optimizer.state.get(p)
        if not state or "exp_avg_sq" not in state:
            raise ValueError(
                "a parameter has no Adam second-moment state: measure the preconditioned "
                "sharpness after the first optimizer.step(), on parameters the optimizer owns"
            )
        v = state["max_exp_avg_sq"] if g["amsgrad"] else state["exp_avg_sq"]
        step = float(state["step"])
        v_hat = v.detach() / (1.0 - beta2**step)
        chunks.append((v_hat.sqrt() + eps).rsqrt().reshape(-1))
    return torch.cat(chunks)


LossFn = Callable[[Tensor, Tensor], Tensor]


def _operator(model, loss_fn, data, params):
    from gradkit.curvature import HessianOperator

    return HessianOperator(model, loss_fn, data, params=params)


def sharpness(model: nn.Module, loss_fn: LossFn, data: Any, *, k: int = 1,
              params: Any = None, generator: torch.Generator | None = None,
              v0: Tensor | None = None, tol: float = 1e-4, return_vectors: bool = False
              ) -> Tensor | tuple[Tensor, Tensor]:
    """Top-``k`` Hessian eigenvalues (largest algebraic, descending) of the mean loss on
    ``data``, by Lanczos on Hessian-vector products (:mod:`gradkit.curvature`).

    Args:
        model: the network.
        loss_fn: its mean-reduced ``loss_fn(outputs, targets)``.
        data: one ``(inputs, targets)`` batch or an iterable of batches.
        k: number of eigenvalues.
        params: the parameters to differentiate (default: all trainable).
        generator: generator of the random start vector.
        v0: a start vector, e.g. the previous top eigenvector (sharpness moves slowly, so
            a warm start needs few products); ignored when its size does not match.
        tol: the relative eigenvalue tolerance of Lanczos.
        return_vectors: also return the eigenvectors ``(n, k)``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from gradkit.instruments import sharpness
        >>> model = nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # mean MSE: H = (2/N) XᵀX = diag(4, 1)
        >>> vals = sharpness(model, nn.functional.mse_loss, (x, torch.zeros(2, 1)), k=2)
        >>> [round(float(v), 4) for v in vals]
        [4.0, 1.0]
    """
    from gradkit.curvature import lanczos

    op = _operator(model, loss_fn, data, params)
    if v0 is not None and v0.shape != (op.shape[0],):
        v0 = None  # the parameter layout changed: start afresh
    vals, vecs = lanczos(op, k, which="largest", generator=generator, v0=v0, tol=tol)
    return (vals, vecs) if return_vectors else vals


def preconditioned_sharpness(model: nn.Module, loss_fn: LossFn, data: Any,
                             optimizer: torch.optim.Optimizer, *, k: int = 1,
                             generator: torch.Generator | None = None) -> Tensor:
    """Top-``k`` eigenvalues of ``P^{-1/2} H P^{-1/2}`` (same spectrum as ``P^{-1}H``) with
    Adam's current preconditioner (see :func:`adam_preconditioner_sqrt_inv`).

    The Hessian is taken w.r.t. the model's trainable parameters, which must all be in
    ``optimizer``; compare with :func:`adam_threshold`.

    Args:
        model: the network.
        loss_fn: its mean-reduced ``loss_fn(outputs, targets)``.
        data: one ``(inputs, targets)`` batch or an iterable of batches.
        optimizer: an ``Adam``/``AdamW`` with state for every trainable parameter.
        k: number of eigenvalues.
        generator: generator of the random start vector.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from gradkit.instruments import preconditioned_sharpness
        >>> model = nn.Linear(2, 1, bias=False)
        >>> opt = torch.optim.Adam(model.parameters(), eps=0.0)
        >>> model.weight.grad = torch.tensor([[4.0, 1.0]])
        >>> opt.step()  # P = diag(4, 1)
        >>> x = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # H = diag(4, 1)
        >>> vals = preconditioned_sharpness(model, nn.functional.mse_loss,
        ...                                 (x, torch.zeros(2, 1)), opt)
        >>> round(float(vals[0]), 4)  # P⁻¹H = I
        1.0
    """
    from gradkit.curvature import lanczos

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    d = adam_preconditioner_sqrt_inv(optimizer, [p for _, p in named])
    op = _operator(model, loss_fn, data, None)
    vals, _ = lanczos(op.sandwich(d.to(op.dtype)), k, which="largest", generator=generator)
    return vals


class TraceEstimate(NamedTuple):
    estimate: float
    stderr: float


def hessian_trace(model: nn.Module, loss_fn: LossFn, data: Any, *, n_probes: int = 20,
                  params: Any = None, generator: torch.Generator | None = None
                  ) -> TraceEstimate:
    """Hutchinson estimate of ``tr ∇²L`` with its standard error (compare with ``2/η``: Wu,
    Wang & Su, "The Implicit Regularization of Dynamical Stability in SGD").

    Args:
        model: the network.
        loss_fn: its mean-reduced ``loss_fn(outputs, targets)``.
        data: one ``(inputs, targets)`` batch or an iterable of batches.
        n_probes: number of Rademacher probes.
        params: the parameters to differentiate (default: all trainable).
        generator: generator of the probes.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from gradkit.instruments import hessian_trace
        >>> model = nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # H = diag(4, 1): exact for Rademacher
        >>> est = hessian_trace(model, nn.functional.mse_loss, (x, torch.zeros(2, 1)),
        ...                     n_probes=4, generator=torch.Generator().manual_seed(0))
        >>> round(est.estimate, 4), round(est.stderr, 4)
        (5.0, 0.0)
    """
    from gradkit.curvature import hutchinson_trace

    res = hutchinson_trace(_operator(model, loss_fn, data, params), n_probes,
                           generator=generator)
    return TraceEstimate(float(res.estimate), float(res.stderr))
