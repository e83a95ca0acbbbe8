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

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from gradkit.optim._fused import cut_into_pieces

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


def _plans_from_stats(stats: Tensor, cols: int, delta: float, eps: float) -> list[Plan]:
    """Eager CPU tests of ``N`` same-shaped tensors ``(C, D)`` from their row statistics
    ``(N, 3, C)`` (:func:`_row_stats`): per tensor ``None`` when it is not projected, else
    ``("channel", row norms of p (C,))`` or ``("layer", norm of p)``.

    The same tests as :func:`project`, batched over the tensors and finished with Python
    branches (reading a CPU tensor costs no device sync). The channel test compares in the
    tensors' dtype as the reference does; the layer test (rarely deciding) is computed in
    Python floats from the row statistics.
    """
    rows = stats.shape[2]
    p_norm, g_norm, gp = stats.unbind(1)
    cos_c = gp.abs().div_(g_norm.clamp_min(eps).mul_(p_norm.clamp_min(eps)))
    channel = (cos_c.amax(1) < delta / math.sqrt(cols)).tolist()
    norms = torch.linalg.vector_norm(stats[:, :2], dim=2).tolist()
    plans: list[Plan] = []
    for i, (is_channel, (pl_norm, gl_norm), gp_sum) in enumerate(
            zip(channel, norms, gp.sum(1).tolist())):
        if is_channel:
            plans.append(("channel", p_norm[i]))
        elif (abs(gp_sum) / (max(gl_norm, eps) * max(pl_norm, eps))
              < delta / math.sqrt(rows * cols)):
            plans.append(("layer", pl_norm))
        else:
            plans.append(None)
    return plans


# row statistics of tensors above this many bytes are taken in pieces of rows this size
STATS_PIECE_BYTES = 1 << 19


def _row_stats(p: Tensor, g: Tensor, stats: Tensor) -> Tensor:
    """Into ``stats`` ``(3, C)``: row norms of ``p`` and ``g`` and row dot products
    ``<g_r, p_r>`` of ``(C, D)`` tensors. Large tensors are read in pieces of rows that stay
    in cache for all three reductions, so each tensor is read from memory once."""
    rows = p.shape[0]
    step = max(1, STATS_PIECE_BYTES * rows // max(1, p.numel() * p.element_size()))
    for a in range(0, rows, step):
        p_a, g_a = p[a:a + step], g[a:a + step]
        torch.linalg.vector_norm(p_a, dim=1, out=stats[0, a:a + step])
        torch.linalg.vector_norm(g_a, dim=1, out=stats[1, a:a + step])
        torch.linalg.vecdot(g_a, p_a, dim=1, out=stats[2, a:a + step])
    return stats


def apply_plan(p: Tensor, u: Tensor, plan: tuple[str, Tensor | float], eps: float) -> Tensor:
    """Project ``u`` ``(C, D)`` in place as :func:`eager_plans` decided; returns ``u``."""
    view, norm = plan
    if view == "channel":
        coef = torch.linalg.vecdot(p, u, dim=1).div_((norm + eps).square_())
        return u.addcmul_(p, coef.unsqueeze(1), value=-1)
    coef = float(torch.linalg.vecdot(p.reshape(-1), u.reshape(-1))) / (norm + eps) ** 2
    return u.add_(p, alpha=-coef)


# plan of a tensor whose test has not been run yet (see project_tensors / cut_by_plan)
UNTESTED = "untested"
Plan = tuple[str, Tensor | float] | None | str


def eager_plans(params: Sequence[Tensor], grads: Sequence[Tensor], delta: float,
                eps: float) -> list[Plan]:
    """The projection test of every large CPU tensor, run now from ``p`` and ``g`` alone so
    that an update that is not projected never has to be materialised (see
    :func:`_plans_from_stats`; same-shaped tensors are tested together). ``None`` for large
    1-D tensors (never projected); :data:`UNTESTED` for the others (small or not on CPU)."""
    out: list[Plan] = []
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(params):
        if (p.device.type != "cpu" or torch.compiler.is_compiling()
                or p.numel() < STACK_BELOW):
            out.append(UNTESTED)
        elif p.ndim <= 1:
            out.append(None)
        else:
            out.append(UNTESTED)
            by_shape.setdefault((p.shape[0], p.numel() // p.shape[0]), []).append(i)
    for (rows, cols), idx in by_shape.items():
        stats = params[idx[0]].new_empty(len(idx), 3, rows)
        for j, i in enumerate(idx):
            _row_stats(params[i].reshape(rows, cols), grads[i].reshape(rows, cols), stats[j])
        for i, plan in zip(idx, _plans_from_stats(stats, cols, delta, eps)):
            out[i] = plan
    return out


def cut_by_plan(tensorlists: list[list[Tensor]], plans: list[Plan], extras: list[object],
                ) -> tuple[list[list[Tensor]], list[Plan], list[object]]:
    """:func:`~gradkit.optim._fused.cut_into_pieces` for the tensors whose plan is known to
    act row by row (not projected, or channel-projected); each piece carries its rows' part
    of the plan."""
    cuttable = [plan is None or (isinstance(plan, tuple) and plan[0] == "channel")
                for plan in plans]
    lists, pairs, rows = cut_into_pieces(tensorlists, list(zip(plans, extras)), cuttable)
    out_plans: list[Plan] = []
    for (plan, _), part in zip(pairs, rows):
        if part is not None and isinstance(plan, tuple):
            plan = ("channel", plan[1][part])
        out_plans.append(plan)
    return lists, out_plans, [extra for _, extra in pairs]


def project_tensors(params: Sequence[Tensor], grads: Sequence[Tensor],
                    direction: Callable[[int], Tensor], delta: float, eps: float,
                    plans: Sequence[Plan] | None = None,
                    ) -> tuple[list[Tensor | None], list[Tensor | bool]]:
    """Eager projection of the update directions of a list of tensors.

    ``direction(i)`` builds tensor ``i``'s unprojected update; it is called only for tensors
    whose update may be projected, and the projection writes into what it returns. Tensors
    with ``ndim <= 1`` are never projected. On CPU, large tensors are tested from ``p`` and
    ``g`` alone (:func:`eager_plans`); small same-shaped tensors (and, on other devices, every
    tensor) go through the branch-free :func:`project`, stacked by shape.

    ``plans`` (from :func:`eager_plans`, possibly cut by :func:`cut_by_plan`) gives the
    tests already run; entries :data:`UNTESTED` are tested here.

    Returns, per tensor, the projected update (``None`` where it is certainly not projected:
    the caller then steps along the plain direction) and whether it was projected (a bool,
    or a bool 0-d tensor from the branch-free path).
    """
    n = len(params)
    out: list[Tensor | None] = [None] * n
    passed: list[Tensor | bool] = [False] * n
    by_shape: dict[tuple[int, ...], list[int]] = {}
    delta_sq = delta * delta
    if plans is None:
        plans = eager_plans(params, grads, delta, eps)
    for i, (p, plan) in enumerate(zip(params, plans)):
        if p.ndim <= 1 or plan is None:
            continue
        if isinstance(plan, str):  # UNTESTED
            by_shape.setdefault(tuple(p.shape), []).append(i)
            continue
        u = direction(i)
        apply_plan(p.reshape(p.shape[0], -1), u.view(p.shape[0], -1), plan, eps)
        out[i], passed[i] = u, True
    for shape, idx in by_shape.items():
        c = shape[0]
        if len(idx) == 1:
            i = idx[0]
            u, ok = project(rows_view(params[i]), rows_view(grads[i]),
                            rows_view(direction(i)), delta_sq, eps)
            out[i], passed[i] = u.view(shape), ok[0]
            continue
        stack = [torch.stack(ts).view(len(idx), c, -1) for ts in (
            [params[i] for i in idx], [grads[i] for i in idx], [direction(i) for i in idx])]
        new_u, ok = project(*stack, delta_sq, eps)
        for j, (i, u_j) in enumerate(zip(idx, new_u.view(len(idx), *shape).unbind(0))):
            out[i], passed[i] = u_j, ok[j]
    return out, passed
