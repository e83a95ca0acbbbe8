"""Packed state, and the two ways the fused paths hand tensors to a compiled kernel.

Packed state: the ``state['step']`` tensors of a param group and, on the fused paths, the
state of small tensors are views into one buffer per kind (:func:`packed_state`), so one op
updates them all. They remain ordinary per-parameter tensors for ``state_dict`` /
``load_state_dict`` / ``deepcopy``; when they are no longer the views handed out (after a
load, or when the set of params with a grad changes) the buffer is rebuilt with one copy.

Kernel drivers (the kernel updates its tensor arguments in place):

* :func:`apply_elementwise`: large contiguous tensors one at a time as flat aliases (no
  copy); all small ones as one flat pack per tensor kind, run once (the packed params are
  copied back). Many small tensors then cost a handful of ops instead of one call each.
* :func:`apply_rows`: for kernels with per-row (channel) and per-tensor reductions. Tensors
  are shown as ``(N, C, D)``: large ones alone, small same-shaped ones stacked; tensors that
  are not row-structured (e.g. biases) packed flat as ``(1, 1, total)`` with ``rows=False``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from gradkit.optim._fused import alias, compiled, run_items
from gradkit.optim._torch_private import flatten, unflatten

# tensors with at least this many elements get their own kernel call (no packing copy)
BIG_NUMEL = 1 << 15

_LAYOUTS = {
    "flat": (flatten, unflatten),
    "stack": (torch.stack, lambda buf, like: list(buf.unbind(0))),
}


def packed_state(opt: torch.optim.Optimizer, params: list[Tensor], key: str,
                 layout: str = "flat") -> Tensor:
    """The packed buffer behind ``opt.state[p][key]`` for ``params`` (built on first use)."""
    cache = opt.__dict__.setdefault("_gradkit_packs", {})  # dropped by Optimizer pickling
    ckey = (tuple(map(id, params)), key, layout)
    hit = cache.get(ckey)
    state = opt.state
    if hit is not None and all(state[p][key] is v for p, v in zip(params, hit[1])):
        return hit[0]
    pack, unpack = _LAYOUTS[layout]
    current = [state[p][key] for p in params]
    buf = pack(current)
    views = unpack(buf, current)
    for p, v in zip(params, views):
        state[p][key] = v
    ids = set(ckey[0])  # forget stale packs of these params (they would pin old buffers)
    for old in [k for k in cache if k[1:] == ckey[1:] and not ids.isdisjoint(k[0])]:
        del cache[old]
    cache[ckey] = (buf, views)
    return buf


def advance_steps(opt: torch.optim.Optimizer, params: list[Tensor]) -> list[float]:
    """``state['step'] += 1`` for every param with one op; the new step counts."""
    steps = packed_state(opt, params, "step")
    steps.add_(1.0)
    return steps.tolist()


def indices_by_value(values: Sequence[float]) -> dict[float, list[int]]:
    """``{value: [positions]}``, e.g. to run one kernel per distinct step count."""
    out: dict[float, list[int]] = {}
    for i, v in enumerate(values):
        out.setdefault(v, []).append(i)
    return out


def _contiguous(tensors: Sequence[Tensor]) -> bool:
    return all(t.is_contiguous() for t in tensors)


def pack_flat(opt: torch.optim.Optimizer, params: list[Tensor], grads: list[Tensor],
              keys: Sequence[str], indices: Sequence[int],
              ) -> tuple[Tensor, Tensor, list[Tensor], Callable[[], None]]:
    """Parameters ``indices`` as one flat tensor each of params (a copy), grads (a copy) and
    state ``keys`` (persistent packed buffers), plus the function that copies the updated
    flat params back."""
    ps = [params[i] for i in indices]
    p_flat = flatten(ps)
    g_flat = flatten([grads[i] for i in indices])
    bufs = [packed_state(opt, ps, k) for k in keys]

    def write_back() -> None:
        torch._foreach_copy_(ps, unflatten(p_flat, ps))

    return p_flat, g_flat, bufs, write_back


def apply_elementwise(opt: torch.optim.Optimizer, kernel: Callable, params: list[Tensor],
                      grads: list[Tensor], keys: Sequence[str], *extra: object,
                      indices: Sequence[int] | None = None) -> None:
    """Run ``kernel(p, g, *state, *extra)`` over the params (``indices``: only those)."""
    idx = range(len(params)) if indices is None else indices
    small, big = [], []
    for i in idx:
        p = params[i]
        tensors = [p, grads[i], *(opt.state[p][k] for k in keys)]
        if p.numel() >= BIG_NUMEL and _contiguous(tensors):
            big.append([alias(t, (-1,)) for t in tensors])
        else:
            small.append(i)
    run_items(kernel, big, *extra)
    if small:
        p_flat, g_flat, bufs, write_back = pack_flat(opt, params, grads, keys, small)
        compiled(kernel)(*[alias(t, (-1,)) for t in (p_flat, g_flat, *bufs)], *extra)
        write_back()


def apply_rows(opt: torch.optim.Optimizer, kernel: Callable, params: list[Tensor],
               grads: list[Tensor], keys: Sequence[str], *extra: object,
               indices: Sequence[int] | None = None) -> None:
    """Run ``kernel(p, g, *state, *extra, rows=...)`` with tensors shaped ``(N, C, D)``;
    tensors with ``ndim > 1`` are row-structured (``C = shape[0]``, ``rows=True``)."""
    idx = range(len(params)) if indices is None else indices
    flat: list[int] = []
    big: list[list[Tensor]] = []
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i in idx:
        p = params[i]
        tensors = [p, grads[i], *(opt.state[p][k] for k in keys)]
        if p.ndim <= 1:
            flat.append(i)
        elif p.numel() >= BIG_NUMEL and _contiguous(tensors):
            big.append([alias(t, (1, p.shape[0], -1)) for t in tensors])
        else:
            by_shape.setdefault(tuple(p.shape), []).append(i)
    run_items(kernel, big, *extra, rows=True)
    run = compiled(kernel)
    for shape, group in by_shape.items():
        ps = [params[i] for i in group]
        p_stack = torch.stack(ps)
        tensors = (p_stack, torch.stack([grads[i] for i in group]),
                   *(packed_state(opt, ps, k, "stack") for k in keys))
        run(*[alias(t, (len(group), shape[0], -1)) for t in tensors], *extra, rows=True)
        torch._foreach_copy_(ps, list(p_stack.unbind(0)))
    if flat:
        p_flat, g_flat, bufs, write_back = pack_flat(opt, params, grads, keys, flat)
        run(*[alias(t, (1, 1, -1)) for t in (p_flat, g_flat, *bufs)], *extra, rows=False)
        write_back()
