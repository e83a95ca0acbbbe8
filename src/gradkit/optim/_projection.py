r"""The AdamP / SGDP scale-invariance projection (Heo et al., ICLR 2021).

For a weight ``p`` with ``ndim > 1``, its raw gradient ``g`` and an update direction ``u``:

.. math::
    \begin{aligned}
        &\textbf{for } \text{view} \in (\text{channel: } (C, D),\ \text{layer: } (1, CD))
            \textbf{ do} \\
        &\hspace{5mm} c_r = \frac{|\langle g_r, p_r \rangle|}
            {\max(\lVert g_r \rVert, \epsilon)\,\max(\lVert p_r \rVert, \epsilon)}
            \quad \text{(one per row of the view)} \\
        &\hspace{5mm} \textbf{if } \max_r c_r < \delta / \sqrt{\text{columns}}
            \textbf{ then} \\
        &\hspace{10mm} \hat p_r = p_r / (\lVert p_r \rVert + \epsilon), \quad
            u_r \leftarrow u_r - \hat p_r \langle \hat p_r, u_r \rangle \\
        &\hspace{10mm} \textbf{return } u, \ \text{wd\_ratio} \\
        &\textbf{return } u, \ 1
    \end{aligned}

:func:`project` is this, line by line, as the authors' ``adamp/adamp.py`` (clovaai/AdamP,
commit 146287b) does it (the cosine as ``F.cosine_similarity``: each norm clamped at ``eps``).
:func:`coefficients` is the same test without data-dependent branches (no host sync), for a
batch of ``N`` same-shaped tensors ``(N, C, D)``: both candidate projections are one
coefficient per row, ``u_r - p_r <p_r, u_r> / (||p_r|| + eps)^2``, and ``torch.where`` picks
channel, layer or none. It serves the foreach path (stacked tensors) and the compiled kernels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# tensors with fewer elements are stacked with same-shaped ones in project_many
STACK_BELOW = 1 << 15
# eager row dot products of tensors with at least this many elements use einsum
EINSUM_FROM = 1 << 16


def project(p: Tensor, g: Tensor, u: Tensor, delta: float, wd_ratio: float,
            eps: float) -> tuple[Tensor, float]:
    r"""``(projected u, weight-decay ratio)`` of one tensor (``ndim > 1``); ``u`` unchanged
    (and ratio 1) when neither view passes the test. ``p_r <p_r, u_r> / (||p_r|| + eps)²``
    is :math:`\hat p_r \langle \hat p_r, u_r \rangle`, written without a temporary
    the size of ``p``."""
    for rows in (p.shape[0], 1):  # channel view, then layer view
        p_view, g_view = p.reshape(rows, -1), g.reshape(rows, -1)
        p_norm = _norm(p_view)
        cosine = _dot(g_view, p_view).abs() / (_norm(g_view).clamp_min(eps)
                                                * p_norm.clamp_min(eps))
        if cosine.max() < delta / math.sqrt(p_view.shape[1]):
            u_view = u.reshape(rows, -1)
            coef = _dot(p_view, u_view) / (p_norm + eps).square()
            return u_view.addcmul(p_view, coef.unsqueeze(-1), value=-1).view_as(u), wd_ratio
    return u, 1.0


def _norm(x: Tensor) -> Tensor:
    """Norms of the rows (last dim); eager: without a full-size temporary."""
    if torch.compiler.is_compiling():
        return (x * x).sum(-1).sqrt()  # inductor fuses it into one pass with the others
    return torch.linalg.vector_norm(x, dim=-1)


def _dot(x: Tensor, y: Tensor) -> Tensor:
    """Dot products of the rows (last dim); large eager tensors: without a full-size
    temporary (``einsum``, whose Python overhead costs more than a small temporary)."""
    if torch.compiler.is_compiling() or x.numel() < EINSUM_FROM:
        return (x * y).sum(-1)
    return torch.einsum("...d,...d->...", x, y)


def _tests(p_norm: Tensor, g_norm: Tensor, gp: Tensor, d: int, delta_sq: float | Tensor,
           eps: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """From row norms and ``<g_r, p_r>`` ``(N, C)`` of rows of length ``d``: the channel and
    layer tests (bool ``(N,)`` each) and the norm of each whole ``p`` ``(N,)``. The test
    ``c < δ/√D`` is evaluated as ``c²·D < δ²`` (the same for ``δ, c ≥ 0``; it avoids a square
    root of a symbolic size under torch.compile)."""
    cos_c = gp.abs() / (g_norm.clamp_min(eps) * p_norm.clamp_min(eps))
    channel = (cos_c * cos_c * d).amax(-1) < delta_sq
    pl_norm = p_norm.square().sum(-1).sqrt()
    gl_norm = g_norm.square().sum(-1).sqrt()
    cos_l = gp.sum(-1).abs() / (gl_norm.clamp_min(eps) * pl_norm.clamp_min(eps))
    layer = (cos_l * cos_l * (p_norm.shape[-1] * d)) < delta_sq
    return channel, layer, pl_norm


def coefficients(p: Tensor, g: Tensor, u: Tensor, delta_sq: float | Tensor,
                 eps: float | Tensor) -> tuple[Tensor, Tensor]:
    """``(coef, passed)`` for ``(N, C, D)`` tensors: the projected update is ``u - p * coef``
    (``coef``: ``(N, C, 1)``, 0 where not projected); ``passed``: bool ``(N,)``. Compiled, the
    four row reductions (``||p_r||², ||g_r||², <g_r, p_r>, <p_r, u_r>``) become one pass over
    ``p, g`` and whatever ``u`` is computed from."""
    p_norm, pu = _norm(p), _dot(p, u)
    channel, layer, pl_norm = _tests(p_norm, _norm(g), _dot(g, p), p.shape[-1], delta_sq, eps)
    coef_c = pu / (p_norm + eps).square()
    coef_l = pu.sum(-1) / (pl_norm + eps).square()
    zero = torch.zeros((), dtype=coef_c.dtype, device=coef_c.device)
    coef = torch.where(channel.unsqueeze(-1), coef_c,
                       torch.where(layer, coef_l, zero).unsqueeze(-1))
    return coef.unsqueeze(-1), channel | layer


def decide_early(params: list[Tensor], grads: list[Tensor], delta: float,
                 eps: float) -> list[bool | None]:
    """For the cache-tiled foreach path: the test of each large CPU weight, run from ``p`` and
    ``g`` alone before any update exists: False (not projected; also every ``ndim <= 1``
    tensor) or True (channel-projected). Both act row by row, so such tensors may be stepped
    in pieces of rows. None where :func:`project_many` must still test (small or non-CPU
    tensors, and layer-projected ones, which need the whole tensor)."""
    out: list[bool | None] = []
    for p, g in zip(params, grads):
        if p.ndim <= 1:
            out.append(False)
        elif p.numel() < STACK_BELOW or p.device.type != "cpu":
            out.append(None)
        else:
            p3, g3 = p.reshape(1, p.shape[0], -1), g.reshape(1, p.shape[0], -1)
            channel, layer, _ = _tests(_norm(p3), _norm(g3), _dot(g3, p3), p3.shape[-1],
                                       delta * delta, eps)
            out.append(True if bool(channel) else None if bool(layer) else False)
    return out


def project_many(params: list[Tensor], grads: list[Tensor], updates: list[Tensor],
                 delta: float, eps: float, decided: list[bool | None] | None = None,
                 ) -> list[Tensor | bool]:
    """Project ``updates[i]`` in place wherever ``params[i]`` (``ndim > 1``) passes the test;
    per tensor, whether it did (a bool, or a bool 0-d tensor).

    ``decided`` (from :func:`decide_early`; the tensors may be row pieces): True projects
    each row, False skips, None tests here. Same-shaped small tensors are tested as one stack
    (a few ops per shape instead of per tensor); large ones alone, through a ``(1, C, D)`` view.
    """
    passed: list[Tensor | bool] = [False] * len(params)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(params):
        known = None if decided is None else decided[i]
        if p.ndim <= 1 or known is False:
            continue
        if known:
            p2, u2 = p.reshape(p.shape[0], -1), updates[i].reshape(p.shape[0], -1)
            coef = _dot(p2, u2) / (_norm(p2) + eps).square()
            u2.addcmul_(p2, coef.unsqueeze(-1), value=-1)
            if u2.data_ptr() != updates[i].data_ptr() or not updates[i].is_contiguous():
                updates[i].copy_(u2.view_as(updates[i]))  # reshape made a copy
            passed[i] = True
            continue
        key = (i,) if p.numel() >= STACK_BELOW else tuple(p.shape)
        by_shape.setdefault(key, []).append(i)
    for idx in by_shape.values():
        c = params[idx[0]].shape[0]
        p3, g3, u3 = (torch.stack([ts[i].reshape(c, -1) for i in idx]) if len(idx) > 1
                      else ts[idx[0]].reshape(1, c, -1) for ts in (params, grads, updates))
        coef, ok = coefficients(p3, g3, u3, delta * delta, eps)
        if p3.device.type == "cpu" and not bool(ok.any()):
            continue  # nothing to project (reading a CPU bool is not a device sync)
        u3.addcmul_(p3, coef, value=-1)
        for j, i in enumerate(idx):
            if len(idx) > 1 or not updates[i].is_contiguous():  # u3 is a copy
                updates[i].copy_(u3[j].reshape(updates[i].shape))
            passed[i] = ok[j]
    return passed
