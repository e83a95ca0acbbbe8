"""The AdamP / SGDP scale-invariance projection (Heo et al., ICLR 2021), written once.

For a weight ``p`` with ``ndim > 1``, its raw gradient ``g`` and an update direction ``u``:

.. math::
    \\begin{aligned}
        &\\textbf{for } \\text{view} \\in (\\text{channel: } (C, D),\\ \\text{layer: } (1, CD))
            \\textbf{ do} \\\\
        &\\hspace{5mm} c_r = \\frac{|\\langle g_r, p_r \\rangle|}
            {\\max(\\lVert g_r \\rVert, \\epsilon)\\,\\max(\\lVert p_r \\rVert, \\epsilon)}
            \\quad \\text{(one per row of the view)} \\\\
        &\\hspace{5mm} \\textbf{if } \\max_r c_r < \\delta / \\sqrt{\\text{columns}}
            \\textbf{ then} \\\\
        &\\hspace{10mm} \\hat p_r = p_r / (\\lVert p_r \\rVert + \\epsilon), \\quad
            u_r \\leftarrow u_r - \\hat p_r \\langle \\hat p_r, u_r \\rangle \\\\
        &\\hspace{10mm} \\textbf{return } u, \\ \\text{wd\\_ratio} \\\\
        &\\textbf{return } u, \\ 1
    \\end{aligned}

The cosine is torch's ``F.cosine_similarity`` (norms clamped below at ``eps``), as in the
authors' ``adamp/adamp.py`` (clovaai/AdamP, commit 146287b). The channel view is tried first;
the layer view only if the channel test fails.

Implementation: branch-free (no host sync), so it runs unchanged under ``torch.compile`` and
on accelerators; only for eager CPU tensors, where reading the test's outcome costs nothing, it
returns early when no tensor of the batch is projected. Inputs are batched as ``(N, C, D)``
(``N`` same-shaped tensors, ``C`` channels of ``D`` entries). Both candidate projections are
expressed as one coefficient per row, ``u_r - p_r * <p_r, u_r> / (||p_r|| + eps)^2``, and
``torch.where`` picks channel, layer or none.
The test ``c < δ/√D`` is evaluated as ``c²·D < δ²`` (the same for ``δ ≥ 0``, ``c ≥ 0``; it
avoids a square root of a symbolic size under ``torch.compile``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# tensors smaller than this are stacked with same-shaped ones in :func:`project_tensors`
STACK_BELOW = 1 << 15
# eager dot products switch from mul+sum to einsum (batched GEMV) at this size
EINSUM_FROM = 1 << 20


def rows_view(t: Tensor) -> Tensor:
    """``t`` as ``(1, C, D)``: one row per output channel (``t.shape[0]``)."""
    return t.reshape(1, t.shape[0], -1)


def _dot(x: Tensor, y: Tensor) -> Tensor:
    """Per-row dot products ``(N, C)`` of ``(N, C, D)`` tensors."""
    if not torch.compiler.is_compiling() and x.numel() >= EINSUM_FROM:
        return torch.einsum("ncd,ncd->nc", x, y)  # large eager: no full-size temporary
    return (x * y).sum(-1)  # inductor fuses this into one reduction pass


def _norm(x: Tensor) -> Tensor:
    if torch.compiler.is_compiling():
        return (x * x).sum(-1).sqrt()
    return torch.linalg.vector_norm(x, dim=-1)


def _tests(p_norm: Tensor, g_norm: Tensor, gp: Tensor, d: int, delta_sq: float | Tensor,
           eps: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """From per-row norms and ``<g_r, p_r>`` ``(N, C)`` of rows of length ``d``: the channel
    and layer tests (bool ``(N,)`` each) and the per-tensor norm of ``p`` ``(N,)``."""
    numel = p_norm.shape[-1] * d
    cos_c = gp.abs() / (g_norm.clamp_min(eps) * p_norm.clamp_min(eps))
    channel = (cos_c * cos_c * d).amax(-1) < delta_sq  # (N,)
    pl_norm = p_norm.square().sum(-1).sqrt()
    gl_norm = g_norm.square().sum(-1).sqrt()
    cos_l = gp.sum(-1).abs() / (gl_norm.clamp_min(eps) * pl_norm.clamp_min(eps))
    layer = (cos_l * cos_l * numel) < delta_sq  # (N,)
    return channel, layer, pl_norm


def _coefficients(pu: Tensor, p_norm: Tensor, pl_norm: Tensor, channel: Tensor,
                  layer: Tensor, eps: float | Tensor) -> Tensor:
    """Per-row coefficient ``(N, C, 1)`` of ``p`` removed from ``u`` (0 where not projected)."""
    coef_c = pu / (p_norm + eps).square()
    coef_l = pu.sum(-1) / (pl_norm + eps).square()
    zero = torch.zeros((), dtype=coef_c.dtype, device=coef_c.device)
    coef = torch.where(channel.unsqueeze(-1), coef_c,
                       torch.where(layer, coef_l, zero).unsqueeze(-1))
    return coef.unsqueeze(-1)


def project(p: Tensor, g: Tensor, u: Tensor, delta_sq: float | Tensor,
            eps: float | Tensor) -> tuple[Tensor, Tensor]:
    """Remove the radial component of ``u`` where ``p`` looks scale-invariant.

    ``p``, ``g``, ``u``: ``(N, C, D)``. ``delta_sq``: δ². Returns the projected update
    (written into ``u`` in place, ``(N, C, D)``) and a bool ``(N,)`` tensor: whether each
    tensor was projected.
    """
    p_norm = _norm(p)
    channel, layer, pl_norm = _tests(p_norm, _norm(g), _dot(g, p), p.shape[-1], delta_sq,
                                     eps)
    passed = channel | layer
    if (not torch.compiler.is_compiling() and p.device.type == "cpu"
            and not bool(passed.any())):
        return u, passed  # nothing to project (reading a CPU bool is not a device sync)
    coef = _coefficients(_dot(p, u), p_norm, pl_norm, channel, layer, eps)
    return u.addcmul_(p, coef, value=-1), passed


def projection_coefficients(p: Tensor, g: Tensor, u: Tensor, delta_sq: float | Tensor,
                            eps: float | Tensor) -> tuple[Tensor, Tensor]:
    """For fused kernels: ``(coef, passed)`` such that the projected update is
    ``u - p * coef`` (``coef``: ``(N, C, 1)``; ``passed``: bool ``(N,)``).

    All four row reductions (``||p_r||², ||g_r||², <g_r, p_r>, <p_r, u_r>``) are taken
    together, so inductor emits them as one pass over ``p, g`` and whatever ``u`` is computed
    from; the caller recomputes ``u`` elementwise in its update pass instead of storing it.
    """
    p_norm = (p * p).sum(-1).sqrt()
    g_norm = (g * g).sum(-1).sqrt()
    gp, pu = (g * p).sum(-1), (p * u).sum(-1)
    channel, layer, pl_norm = _tests(p_norm, g_norm, gp, p.shape[-1], delta_sq, eps)
    return _coefficients(pu, p_norm, pl_norm, channel, layer, eps), channel | layer


def project_tensors(params: Sequence[Tensor], grads: Sequence[Tensor],
                    updates: list[Tensor], delta: float, eps: float,
                    ) -> tuple[list[Tensor], list[Tensor | None]]:
    """Eager projection of a list of updates; tensors with ``ndim <= 1`` are left alone.

    Small same-shaped tensors are stacked and projected together (one batch of ops instead
    of one per tensor); large ones are projected one at a time, in place. Returns the updates
    and, per tensor, a bool 0-d "projected" tensor (``None`` if never projected).
    """
    out = list(updates)
    passed: list[Tensor | None] = [None] * len(updates)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    delta_sq = delta * delta
    for i, p in enumerate(params):
        if p.ndim <= 1:
            continue
        if p.numel() >= STACK_BELOW:
            new_u, ok = project(rows_view(p), rows_view(grads[i]), rows_view(updates[i]),
                                delta_sq, eps)
            out[i] = new_u.view(p.shape)
            passed[i] = ok[0]
        else:
            by_shape.setdefault(tuple(p.shape), []).append(i)
    for shape, idx in by_shape.items():
        c = shape[0]
        stack = [torch.stack([ts[i] for i in idx]).view(len(idx), c, -1)
                 for ts in (params, grads, updates)]
        new_u, ok = project(*stack, delta_sq, eps)
        for j, (i, u_j) in enumerate(zip(idx, new_u.view(len(idx), *shape).unbind(0))):
            out[i] = u_j
            passed[i] = ok[j]
    return out, passed


def decay_factors(passed: Sequence[Tensor | None], base: float, projected: float,
                  like: Tensor) -> list[Tensor | float]:
    """Per tensor multiplicative decay: ``projected`` where the projection fired, else ``base``.

    Returned as 0-d tensors of ``like``'s dtype (no host sync) or plain floats (no projection).
    """
    if not any(x is not None for x in passed):
        return [base] * len(passed)
    t_base = torch.tensor(base, dtype=like.dtype, device=like.device)
    t_proj = torch.tensor(projected, dtype=like.dtype, device=like.device)
    return [base if ok is None else torch.where(ok, t_proj, t_base) for ok in passed]
