"""⊥Grad (PerpGrad / OrthoGrad): step on the gradient component orthogonal to the weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradkit.optim._base import evaluate_closure, group_gradients
from gradkit.optim._registry import register
from gradkit.optim._wrapper import WrapperOptimizer, build_base

_TINY = 1e-30
# scales below this are clamped to it (x / scale stays finite; the result is unchanged)
_SCALE_FLOOR = torch.finfo(torch.float32).tiny


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16 / bfloat16 (float16 cannot hold the 1e-30 guard), else ``dtype``."""
    return torch.promote_types(dtype, torch.float32)


def _orthogonal_one(w: Tensor, g: Tensor) -> Tensor:
    """One tensor's ⊥Grad direction, scale-safe: the result is proportional to the scale of
    ``g`` and independent of the scale of ``w``, so both are divided by their largest entry
    first (a float32 gradient of 1e19 would otherwise overflow its squared norm)."""
    if g.numel() == 0:
        return g.clone()
    work = _work_dtype(g.dtype)
    g_flat, w_flat = g.reshape(-1).to(work), w.reshape(-1).to(work)
    g_scale = g_flat.abs().amax().clamp_min(_SCALE_FLOOR)
    w_unit = w_flat / w_flat.abs().amax().clamp_min(_SCALE_FLOOR)
    g_unit = g_flat / g_scale
    coef = torch.dot(w_unit, g_unit) / (torch.dot(w_unit, w_unit) + _TINY)
    perp = g_unit - coef * w_unit
    norm_ratio = torch.linalg.vector_norm(g_unit) / (torch.linalg.vector_norm(perp) + _TINY)
    return (perp * (norm_ratio * g_scale)).reshape(g.shape).to(g.dtype)


def _orthogonal_foreach(params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
    """:func:`_orthogonal_one` on lists with ``torch._foreach_*`` ops."""
    gs = [g.to(_work_dtype(g.dtype)) for g in grads]
    ws = [w.to(g.dtype) for w, g in zip(params, gs)]
    g_scales = torch._foreach_norm(gs, float("inf"))
    w_scales = torch._foreach_norm(ws, float("inf"))
    torch._foreach_clamp_min_(g_scales, _SCALE_FLOOR)
    torch._foreach_clamp_min_(w_scales, _SCALE_FLOOR)
    g_unit = torch._foreach_div(gs, g_scales)
    w_unit = torch._foreach_div(ws, w_scales)
    dots = [torch.dot(w.reshape(-1), g.reshape(-1)) for w, g in zip(w_unit, g_unit)]
    w_sq = torch._foreach_norm(w_unit)
    coefs = torch._foreach_div(dots, torch._foreach_add(torch._foreach_mul(w_sq, w_sq), _TINY))
    perp = torch._foreach_sub(g_unit, torch._foreach_mul(w_unit, coefs))
    ratios = torch._foreach_div(torch._foreach_norm(g_unit),
                                torch._foreach_add(torch._foreach_norm(perp), _TINY))
    torch._foreach_mul_(ratios, g_scales)
    torch._foreach_mul_(perp, ratios)
    return [d.to(g.dtype) for d, g in zip(perp, grads)]


def orthogonal_gradients(params: list[Tensor], grads: list[Tensor], *,
                         foreach: bool = False) -> list[Tensor]:
    """Per tensor: ``g⊥ = g − <w,g>/(<w,w>+1e-30)·w`` rescaled to ``||g||`` (new tensors).

    Computed scale-safely (on ``g / max|g|`` and ``w / max|w|``, the guards acting on those)
    and in float32 for float16 / bfloat16 tensors, so it stays finite wherever the gradient
    is: a zero float16 gradient gives zero, a float32 gradient of 1e19 does not overflow.
    """
    if foreach and grads:
        return _orthogonal_foreach(params, grads)
    return [_orthogonal_one(w, g) for w, g in zip(params, grads)]


@register("perpgrad")
class PerpGrad(WrapperOptimizer):
    r"""⊥Grad: any base optimizer stepping on gradients projected orthogonal to the weights.

    .. math::
        \begin{aligned}
            &\textbf{for each parameter tensor } w \text{ (flattened), gradient } g:\\
            &\quad g_\perp \leftarrow g - \frac{\langle w, g\rangle}{\langle w, w\rangle
                + 10^{-30}}\, w, \qquad
                \tilde g \leftarrow g_\perp\, \frac{\lVert g\rVert}{\lVert g_\perp\rVert
                + 10^{-30}}\\
            &\text{base optimizer step with gradients } \tilde g
        \end{aligned}

    Paper: L. Prieto, M. Barsbey, P. Mediano, T. Birdal, "Grokking at the Edge of Numerical
    Stability" (ICLR 2025). Reference matched: ``LucasPrietoAl/grokking-at-the-edge-of-
    numerical-stability`` ``orthograd.py`` (projection per tensor, biases included, rescaled
    to the original norm, ``1e-30`` guards; ``w = 0`` leaves ``g`` unchanged).

    **p.grad is not modified** (choice): the reference overwrites ``p.grad`` with the
    projected gradient; here the projected gradient is handed to the base optimizer for the
    duration of its step and the user's gradient tensor is put back, so after ``step()``
    ``p.grad`` is the same tensor with the same values as before.

    A wrapper: ``param_groups`` and ``state`` are the base optimizer's live objects (lr
    schedulers on the wrapper change the base lr; ``state_dict`` is the base's)::

        opt = PerpGrad(model.parameters(), base="sgd", lr=1e-2, momentum=0.8)
        opt = PerpGrad(base=torch.optim.AdamW(model.parameters(), lr=1e-3))

    Computed scale-safely and in float32 for float16/bfloat16 tensors (see
    :func:`orthogonal_gradients`), so the projected gradient is finite wherever the gradient
    is; the guards act on ``w/max|w|`` and ``g/max|g|`` (a documented departure from the
    reference, whose unscaled ``1e-30`` underflows in float16 and whose norms overflow for
    float32 gradients ≥ 1e19; on ordinary values the two agree to rounding).

    Example (``w = [1, 0]``, ``g = [1, 1]``: ``g⊥ = [0, 1]``, rescaled to ``||g|| = √2``)::

        >>> import torch
        >>> from gradkit.optim import PerpGrad
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
        >>> opt = PerpGrad([w], base="sgd", lr=1.0)
        >>> w.grad = torch.tensor([1.0, 1.0])
        >>> opt.step()
        >>> w.detach(), w.grad  # p.grad is left as it was
        (tensor([ 1.0000, -1.4142]), tensor([1., 1.]))

    Args:
        params: iterable of parameters or named_parameters to optimize, or dicts defining
            parameter groups; None when ``base`` is an optimizer instance.
        base: the base optimizer: a registry name (``"sgd"``, ``"adamw"``, ...), an
            optimizer class, or an instance (default: "sgd").
        perp_foreach: compute the projection with ``torch._foreach_*``; None picks it on
            CUDA-class devices only. Kept apart from the base optimizer's own ``foreach``
            (default: None).
        **base_kwargs: arguments of the base optimizer (``lr``, ``momentum``, ``foreach``,
            ...).
    """

    def __init__(self, params: Any = None, base: Any = "sgd", *,
                 perp_foreach: bool | None = None, **base_kwargs: Any) -> None:
        inner = build_base(params, base, base_kwargs, "PerpGrad")
        super().__init__(inner, {"perp_foreach": perp_foreach})

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        saved: list[tuple[Tensor, Tensor]] = []
        try:
            for group in self.param_groups:
                params, grads, foreach = group_gradients("PerpGrad", group, negate=False,
                                                         foreach_key="perp_foreach")
                for p, g in zip(params, orthogonal_gradients(params, grads, foreach=foreach)):
                    saved.append((p, p.grad))
                    p.grad = g
            self.base.step()
        finally:
            for p, g in saved:
                p.grad = g
        return loss
