"""Compile helpers for the ``fused=True`` paths (``torch.compile``).

A fused step is a *kernel*: a plain function of tensors that updates some of them in place,
compiled with ``torch.compile(dynamic=True, fullgraph=True)`` (dynamic shapes: one graph serves
every tensor size). Hyperparameters reach a kernel as one small 1-D tensor built from a
``NamedTuple`` of floats (:func:`scalars`, read back by name with :func:`fields`), never as
Python floats, so a scheduler changing ``param_group['lr']`` re-uses the compiled code.

Each *variant* of a kernel (dtype, device, the Python flags it is called with, which sizes are
1) gets its own copy of the function, hence its own compile cache: torch.compile keeps at most
``torch._dynamo.config.recompile_limit`` graphs per function and, with ``fullgraph=True``,
raises ``FailOnRecompileLimitHit`` past it. With one variant per copy a long-lived process
(many dtypes, flags, shapes) never gets near the limit.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor

from gradkit.optim._torch_private import compile_count, without_duck_sizing

__all__ = ["CHUNK", "alias", "compile_count", "compiled", "fields", "run_items", "scalars"]

S = TypeVar("S", bound=NamedTuple)


def scalars(values: NamedTuple, like: Tensor) -> Tensor:
    """Hyperparameters as one 1-D tensor of ``like``'s dtype and device."""
    return torch.tensor(list(values), dtype=like.dtype, device=like.device)


def fields(cls: type[S], s: Tensor) -> S:
    """Inside a kernel: the entries of :func:`scalars`' tensor ``s`` by name (0-d tensors)."""
    return cls(*(s[i] for i in range(len(cls._fields))))


def _variant_key(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple:
    key: list[Any] = []
    for a in [*args, *kwargs.items()]:
        if isinstance(a, Tensor):
            key.append((a.dtype, a.device, tuple(d == 1 for d in a.shape)))
        elif isinstance(a, (list, tuple)):
            key.append(_variant_key(a, {}))
        else:
            key.append(a)
    return tuple(key)


@functools.cache
def _compile_variant(kernel: Callable, key: tuple) -> Callable:
    """``kernel`` compiled under its own copy of the code object (own compile cache)."""
    code = kernel.__code__.replace(co_name=f"{kernel.__name__}_v{len(_VARIANTS)}")
    _VARIANTS.append(key)
    fn = types.FunctionType(code, kernel.__globals__, code.co_name, kernel.__defaults__,
                            kernel.__closure__)
    fn.__kwdefaults__ = kernel.__kwdefaults__
    return without_duck_sizing(torch.compile(fn, dynamic=True, fullgraph=True))


_VARIANTS: list[tuple] = []


def compiled(kernel: Callable) -> Callable:
    """``kernel`` compiled per variant (see the module docstring); call it like ``kernel``."""
    def run(*args: object, **kwargs: object) -> object:
        return _compile_variant(kernel, _variant_key(args, kwargs))(*args, **kwargs)

    run.__wrapped__ = kernel  # type: ignore[attr-defined]
    return run


# Large tensors are handed to a kernel CHUNK at a time in one compiled call (see run_items):
# torch.compile's per-call cost (guards, wrappers: tens of microseconds) is then paid once.
CHUNK = 4


@functools.cache
def _many(kernel: Callable) -> Callable:
    """``items -> [kernel(*ts, *extra) for ts in items]`` (dynamo unrolls the loop)."""
    def many(items: Sequence[Sequence[Tensor]], *extra: object, **kwargs: object) -> None:
        for tensors in items:
            kernel(*tensors, *extra, **kwargs)

    many.__name__ = f"{kernel.__name__}_many"
    return many


def run_items(kernel: Callable, items: list[list[Tensor]], *extra: object,
              **kwargs: object) -> None:
    """Compiled ``kernel`` on each item: :data:`CHUNK` items per compiled call, the
    remainder one call each (so only one list length is compiled)."""
    n = len(items) - len(items) % CHUNK
    many = compiled(_many(kernel))
    for j in range(0, n, CHUNK):
        many(items[j:j + CHUNK], *extra, **kwargs)
    one = compiled(kernel)
    for tensors in items[n:]:
        one(*tensors, *extra, **kwargs)


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
