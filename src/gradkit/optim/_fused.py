"""Shared machinery for the multi-tensor and fused (``torch.compile``) optimizer paths.

A fused step is a *kernel*: a plain function of tensors that updates some of them in place,
compiled once with ``torch.compile(dynamic=True, fullgraph=True)``. Hyperparameters reach the
kernel as one small 1-D tensor of scalars (:func:`scalars`), never as Python floats, so changing
``param_group['lr']`` (schedulers) re-uses the compiled code instead of recompiling.

Tensors are handed to a kernel in one of two layouts:

* :func:`apply_elementwise`: large contiguous tensors as flat views (no copy), up to
  :data:`CHUNK` of them per compiled call (:func:`run_items`);
  all small ones concatenated into one flat buffer, run once, and copied back. Many small
  tensors then cost a handful of ops instead of one kernel call each.
* :func:`apply_rows`: for kernels that need per-row (channel) and per-tensor reductions.
  Tensors are shown as ``(N, C, D)``: large ones alone as views (chunked like above), small
  same-shaped ones stacked.
  Tensors flagged as not row-structured (e.g. biases) are concatenated as ``(1, 1, total)`` and
  the kernel is told so through its ``rows`` argument.

Dynamic shapes mean one compilation serves every tensor size (sizes 0 and 1 are specialised by
torch, so a few variants can exist, e.g. ``N = 1`` vs ``N > 1`` stacks; each compiles once
per process). Duck sizing is off, so square and non-square tensors share a graph.

Packed state: the ``state['step']`` tensors of a param group (all paths) and, on the fused
path, the state of small tensors are views into one buffer per kind (:func:`packed_state`), so
one op updates them all. They remain ordinary per-parameter tensors for ``state_dict`` /
``load_state_dict`` / ``deepcopy``; after a load the buffers are rebuilt on the next step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch._C._nn import flatten_dense_tensors, unflatten_dense_tensors
from torch.fx.experimental import _config as _fx_config

from gradkit.optim._base import group_by_device_and_dtype, params_with_grad, resolve_impl

# Tensors with at least this many elements get their own kernel call (no packing copy).
BIG_NUMEL = 1 << 15


@functools.cache
def compiled(kernel: Callable) -> Callable:
    """``kernel`` compiled once per process (dynamic shapes, whole graph).

    Duck sizing is switched off while tracing: otherwise a square first input (C == D) makes
    dynamo assume every later input is square too and recompile for the first non-square one.
    """
    fn = torch.compile(kernel, dynamic=True, fullgraph=True)

    @functools.wraps(kernel)
    def run(*args: object, **kwargs: object) -> object:
        previous = _fx_config.use_duck_shape  # (config.patch costs ~10x more per call)
        _fx_config.use_duck_shape = False
        try:
            return fn(*args, **kwargs)
        finally:
            _fx_config.use_duck_shape = previous

    return run


# Large tensors are handed to a kernel CHUNK at a time in one compiled call (see run_items).
CHUNK = 4


@functools.cache
def compiled_many(kernel: Callable) -> Callable:
    """``compiled`` version of ``items -> [kernel(*ts, *extra) for ts in items]``.

    One call then runs the kernel on several tensors (dynamo unrolls the loop into one graph),
    paying torch.compile's per-call cost (guards, wrappers: tens of microseconds) once. The
    function gets its own code object so that its compile cache is separate per kernel.
    """
    def many(items: Sequence[Sequence[Tensor]], *extra: object, **kwargs: object) -> None:
        for tensors in items:
            kernel(*tensors, *extra, **kwargs)

    name = f"{kernel.__name__}_many"
    many.__code__ = many.__code__.replace(co_name=name)
    many.__name__ = many.__qualname__ = name
    return compiled(many)


def run_items(kernel: Callable, items: list[list[Tensor]], *extra: object,
              **kwargs: object) -> None:
    """Run compiled ``kernel`` on each item: in chunks of :data:`CHUNK` per compiled call
    (only that one list length is compiled), the remainder one call per item."""
    n = len(items) - len(items) % CHUNK
    if n:
        many = compiled_many(kernel.__wrapped__)
        for j in range(0, n, CHUNK):
            many(items[j:j + CHUNK], *extra, **kwargs)
    for tensors in items[n:]:
        kernel(*tensors, *extra, **kwargs)


def compile_count() -> int:
    """Number of graphs torch.compile has produced in this process (recompiles included)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def scalars(values: Sequence[float], like: Tensor) -> Tensor:
    """Hyperparameters as one 1-D tensor of ``like``'s dtype and device (computed in double)."""
    return torch.tensor(list(values), dtype=like.dtype, device=like.device)


def indices_by_value(values: Sequence[float]) -> dict[float, list[int]]:
    """``{value: [positions]}``, e.g. to run one kernel per distinct step count."""
    out: dict[float, list[int]] = {}
    for i, v in enumerate(values):
        out.setdefault(v, []).append(i)
    return out


def alias(t: Tensor, shape: Sequence[int]) -> Tensor:
    """A contiguous ``t`` reshaped WITHOUT being a view (``_base`` is None, storage shared).

    torch.compile guards on whether an input is a view and on its base; aliasing through
    ``set_`` gives every kernel input the same kind, so views and packed buffers share one
    compiled graph.
    """
    shape = list(shape)
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = t.numel() // known if known else 0
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), shape)


def _contiguous(tensors: Sequence[Tensor]) -> bool:
    return all(t.is_contiguous() for t in tensors)


# ------------------------------------------------------------------------ packed state
# Small tensors' state lives in one packed buffer per (pack, state key): the tensors in
# ``optimizer.state`` are views into it, so the kernel updates them with no copies. The
# buffers are rebuilt (one copy) whenever the state tensors are no longer the views handed
# out, e.g. after ``load_state_dict`` or when the set of params with a grad changes.
def _flat_pack(ts: list[Tensor]) -> Tensor:
    return flatten_dense_tensors(ts)


def _flat_unpack(buf: Tensor, like: list[Tensor]) -> list[Tensor]:
    return list(unflatten_dense_tensors(buf, like))


def _stack_pack(ts: list[Tensor]) -> Tensor:
    return torch.stack(ts)


def _stack_unpack(buf: Tensor, like: list[Tensor]) -> list[Tensor]:
    return list(buf.unbind(0))


LAYOUTS = {"flat": (_flat_pack, _flat_unpack), "stack": (_stack_pack, _stack_unpack)}


def packed_state(opt: torch.optim.Optimizer, params: list[Tensor], key: str,
                 layout: str = "flat") -> Tensor:
    """The packed buffer behind ``opt.state[p][key]`` for ``params`` (built on first use)."""
    cache = opt.__dict__.setdefault("_gradkit_packs", {})  # dropped by Optimizer pickling
    ckey = (tuple(map(id, params)), key, layout)
    hit = cache.get(ckey)
    state = opt.state
    if hit is not None and all(state[p][key] is v for p, v in zip(params, hit[1])):
        return hit[0]
    pack, unpack = LAYOUTS[layout]
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


def advance_packed_steps(opt: torch.optim.Optimizer, params: list[Tensor]) -> list[float]:
    """``step += 1`` for every param with one op (the step tensors are views of one buffer)."""
    steps = packed_state(opt, params, "step")
    steps.add_(1.0)
    return steps.tolist()


# ---------------------------------------------------------------------- kernel drivers
def apply_elementwise(opt: torch.optim.Optimizer, kernel: Callable, params: list[Tensor],
                      grads: list[Tensor], keys: Sequence[str], *extra: object,
                      indices: Sequence[int] | None = None) -> None:
    """Run ``kernel(p, g, *state, *extra)`` (updates p and state in place) over all params.

    Large contiguous tensors are passed one at a time as flat aliases; the small ones as one
    flat buffer per tensor kind: packed params (copied back after the kernel), packed grads,
    and the persistent packed state. ``indices`` restricts the work to some parameters.
    """
    idx = range(len(params)) if indices is None else indices
    state = opt.state
    small, big = [], []
    for i in idx:
        p = params[i]
        tensors = [p, grads[i], *(state[p][k] for k in keys)]
        if p.numel() >= BIG_NUMEL and _contiguous(tensors):
            big.append([alias(t, (-1,)) for t in tensors])
        else:
            small.append(i)
    run_items(kernel, big, *extra)
    if small:
        p_flat, g_flat, bufs, write_back = pack_flat(opt, params, grads, keys, small)
        kernel(*[alias(t, (-1,)) for t in (p_flat, g_flat, *bufs)], *extra)
        write_back()


def pack_flat(opt: torch.optim.Optimizer, params: list[Tensor], grads: list[Tensor],
              keys: Sequence[str], indices: Sequence[int],
              ) -> tuple[Tensor, Tensor, list[Tensor], Callable[[], None]]:
    """Parameters ``indices`` as one flat tensor each of params (a copy), grads (a copy) and
    state ``keys`` (the persistent packed buffers of :func:`packed_state`), plus the function
    that copies the updated flat params back. An elementwise update then runs once on the
    pack instead of once per small tensor."""
    ps = [params[i] for i in indices]
    p_flat = flatten_dense_tensors(ps)
    g_flat = flatten_dense_tensors([grads[i] for i in indices])
    bufs = [packed_state(opt, ps, k) for k in keys]

    def write_back() -> None:
        torch._foreach_copy_(ps, unflatten_dense_tensors(p_flat, ps))

    return p_flat, g_flat, bufs, write_back


def apply_rows(opt: torch.optim.Optimizer, kernel: Callable, params: list[Tensor],
               grads: list[Tensor], keys: Sequence[str], row_structured: Sequence[bool],
               *extra: object, indices: Sequence[int] | None = None) -> None:
    """Run ``kernel(p, g, *state, *extra, rows=...)`` with tensors shaped ``(N, C, D)``.

    Row-structured tensors (``row_structured[i]``) are shown with ``C = shape[0]`` rows and
    ``rows=True``: large ones alone, small same-shaped ones stacked. The others are packed flat
    as ``(1, 1, total)`` with ``rows=False``. State of packed tensors is persistent (see
    :func:`packed_state`); packed params are copied back after the kernel.
    """
    idx = range(len(params)) if indices is None else indices
    state = opt.state
    flat: list[int] = []
    big: list[list[Tensor]] = []
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i in idx:
        p = params[i]
        tensors = [p, grads[i], *(state[p][k] for k in keys)]
        if not row_structured[i]:
            flat.append(i)
        elif p.numel() >= BIG_NUMEL and _contiguous(tensors):
            big.append([alias(t, (1, p.shape[0], -1)) for t in tensors])
        else:
            by_shape.setdefault(tuple(p.shape), []).append(i)
    run_items(kernel, big, *extra, rows=True)
    for shape, group in by_shape.items():
        ps = [params[i] for i in group]
        p_stack = torch.stack(ps)
        tensors = (p_stack, torch.stack([grads[i] for i in group]),
                   *(packed_state(opt, ps, k, "stack") for k in keys))
        kernel(*[alias(t, (len(group), shape[0], -1)) for t in tensors], *extra, rows=True)
        torch._foreach_copy_(ps, list(p_stack.unbind(0)))
    if flat:
        ps = [params[i] for i in flat]
        p_flat = flatten_dense_tensors(ps)
        tensors = (p_flat, flatten_dense_tensors([grads[i] for i in flat]),
                   *(packed_state(opt, ps, k) for k in keys))
        kernel(*[alias(t, (1, 1, -1)) for t in tensors], *extra, rows=False)
        torch._foreach_copy_(ps, unflatten_dense_tensors(p_flat, ps))


# ------------------------------------------------------------------- cache-sized slices
# The eager paths run a whole step (every op) on one slice of the parameter list before moving
# to the next, with slices sized so that the slice's parameters, gradients, state and
# temporaries stay in the per-core L2 cache. Each op then reads what the previous op just
# wrote instead of streaming the whole model from memory once per op (the way one foreach op
# per step over all parameters does). Budget in parameter bytes per slice; a tensor larger
# than the budget forms a slice of its own.
CACHE_SLICE_BYTES = 1 << 20


def cache_slices(params: Sequence[Tensor], budget: int = CACHE_SLICE_BYTES) -> list[slice]:
    """Consecutive slices of ``params`` holding at most ``budget`` bytes each (or one tensor)."""
    out: list[slice] = []
    start, size = 0, 0
    for i, p in enumerate(params):
        nbytes = p.numel() * p.element_size()
        if i > start and size + nbytes > budget:
            out.append(slice(start, i))
            start, size = i, 0
        size += nbytes
    if start < len(params):
        out.append(slice(start, len(params)))
    return out


# the eager paths cut tensors of more than CUT_ABOVE bytes into pieces of PIECE_BYTES
CUT_ABOVE = 1 << 20
PIECE_BYTES = 1 << 19


def cut_into_pieces(tensorlists: list[list[Tensor]], extras: list[object],
                    cuttable: Sequence[bool] | None = None, budget: int = PIECE_BYTES,
                    above: int = CUT_ABOVE,
                    ) -> tuple[list[list[Tensor]], list[object], list[slice | None]]:
    """Tensors of more than ``above`` bytes (and ``cuttable``, default all) cut into pieces
    of whole rows (``shape[0]``; elements for 1-D tensors) of about ``budget`` bytes, in all
    of ``tensorlists`` alike: views, so in-place updates reach the tensors. Pieces are 2-D
    ``(rows, D)`` (1-D for 1-D tensors); each carries its tensor's ``extras`` entry. Also
    returns each piece's rows of its tensor (None for a tensor kept whole). Tensors whose
    companions are not all contiguous are kept whole."""
    out: list[list[Tensor]] = [[] for _ in tensorlists]
    out_extras: list[object] = []
    out_rows: list[slice | None] = []
    for i, extra in enumerate(extras):
        group = [ts[i] for ts in tensorlists]
        p = group[0]
        nbytes = p.numel() * p.element_size()
        if (nbytes <= above or (cuttable is not None and not cuttable[i])
                or not _contiguous(group)):
            for dst, t in zip(out, group):
                dst.append(t)
            out_extras.append(extra)
            out_rows.append(None)
            continue
        rows = p.shape[0] if p.ndim > 1 else p.numel()
        views = [t.view(rows, -1) if p.ndim > 1 else t.view(-1) for t in group]
        step = max(1, budget * rows // nbytes)
        for start in range(0, rows, step):
            for dst, v in zip(out, views):
                dst.append(v[start:start + step])
            out_extras.append(extra)
            out_rows.append(slice(start, start + step))
    return out, out_extras, out_rows


class MultiPathOptimizer(torch.optim.Optimizer):
    """``step`` skeleton shared by gradkit optimizers with loop / foreach / fused paths.

    Subclasses set ``_name`` and implement ``_init_state(params) -> tuple of state lists``
    (parallel to ``params``) and ``_loop`` / ``_foreach`` / ``_fused``, each called as
    ``(group, params, grads, *state_lists)``; foreach and fused receive one device/dtype
    bucket at a time; loop and foreach receive it in :func:`cache_slices` (the whole step per
    slice, so state stays in cache). The closure runs under ``torch.enable_grad()``; params
    whose grad is None are skipped (their state is created the first time a grad appears);
    sparse grads raise ``RuntimeError``.
    """

    _name = "Optimizer"

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)

    def _init_state(self, params: list[Tensor]) -> tuple[list[Tensor], ...]:
        raise NotImplementedError

    def _loop(self, group: dict, params: list[Tensor], grads: list[Tensor], *state) -> None:
        raise NotImplementedError

    _foreach = _loop
    _fused = _loop

    @torch.no_grad()
    def step(self, closure: Callable[[], object] | None = None) -> object:
        """Perform one optimisation step; ``closure`` re-evaluates and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads = params_with_grad(self._name, group)
            if not params:
                continue
            state_lists = self._init_state(params)
            impl = resolve_impl(params, group["foreach"], group["fused"], False)
            if impl == "loop":
                for part in cache_slices(params):
                    self._loop(group, params[part], grads[part], *(s[part] for s in state_lists))
                continue
            buckets = group_by_device_and_dtype([params, grads, *state_lists])
            for (p_bucket, g_bucket, *state_bucket), _ in buckets.values():
                if impl == "fused":
                    self._fused(group, p_bucket, g_bucket, *state_bucket)
                    continue
                for part in cache_slices(p_bucket):
                    self._foreach(group, p_bucket[part], g_bucket[part],
                                  *(s[part] for s in state_bucket))
        return loss
