"""Every private torch API gradkit.optim relies on, in one place, each with the reason.

If a torch release moves one of these, this module is the only one to fix. (``torch._foreach_*``
ops are not listed: torch.optim's own multi-tensor paths are written with them.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def default_foreach(params: Sequence[Tensor], differentiable: bool) -> bool:
    """torch's rule for ``foreach=None``: on only where every tensor is on a device with fast
    foreach kernels (CUDA-class devices, not CPU). Why private: the list of such devices lives
    in ``torch.optim.optimizer._default_to_fused_or_foreach``; copying it would drift."""
    from torch.optim.optimizer import _default_to_fused_or_foreach

    return _default_to_fused_or_foreach(list(params), differentiable, use_fused=False)[1]


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """The tensors concatenated flat into one new tensor. Why private:
    ``torch._utils._flatten_dense_tensors`` does it in one C++ call; a Python loop of
    ``reshape(-1)`` costs about a microsecond per tensor (a millisecond for 1000 tensors)."""
    return torch._utils._flatten_dense_tensors(list(tensors))


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Views of ``flat`` shaped like ``like`` (the inverse of :func:`flatten`); same reason."""
    return list(torch._utils._unflatten_dense_tensors(flat, list(like)))


def without_duck_sizing(fn: Callable) -> Callable:
    """``fn`` traced with duck sizing off. Why private: by default dynamo gives equal sizes
    the same symbol, so a square first input (C == D) makes it assume every later input is
    square and compile again for the first non-square one. ``torch.fx.experimental._config``
    is the only switch (``config.patch`` costs ~10x more per call than setting the flag)."""
    from torch.fx.experimental import _config

    def run(*args: object, **kwargs: object) -> object:
        previous = _config.use_duck_shape
        _config.use_duck_shape = False
        try:
            return fn(*args, **kwargs)
        finally:
            _config.use_duck_shape = previous

    return run


def compile_count() -> int:
    """Graphs torch.compile has produced in this process (recompiles included). Why private:
    ``torch._dynamo.utils.counters`` is the only record; tests and the step benchmark use it
    to prove that a schedule changing ``lr`` does not recompile."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
