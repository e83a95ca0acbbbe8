"""Flat-vector views of a set of named parameters (for operators, M-FAC, instruments)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn


class FlatParams:
    """The layout of named tensors laid end to end in one vector.

    ``FlatParams.from_module(model)`` takes the trainable parameters in ``named_parameters``
    order; ``names`` restricts to a subset (a layer, a block).
    """

    def __init__(self, named: Sequence[tuple[str, Tensor]]):
        if not named:
            raise ValueError("FlatParams needs at least one tensor")
        self.names: list[str] = [n for n, _ in named]
        self.shapes: list[torch.Size] = [t.shape for _, t in named]
        self.numels: list[int] = [t.numel() for _, t in named]
        self.dtype = named[0][1].dtype
        self.device = named[0][1].device
        self.numel = sum(self.numels)

    @classmethod
    def from_module(cls, module: nn.Module, names: Iterable[str] | None = None) -> FlatParams:
        params = dict(module.named_parameters())
        if names is None:
            chosen = [(n, p) for n, p in params.items() if p.requires_grad]
        else:
            names = list(names)
            unknown = [n for n in names if n not in params]
            if unknown:
                raise ValueError(
                    f"unknown parameter name(s) {unknown}; the module has {list(params)}"
                )
            chosen = [(n, params[n]) for n in names]
        return cls(chosen)

    def flatten(self, tensors: Sequence[Tensor] | Mapping[str, Tensor]) -> Tensor:
        """Concatenate tensors (a sequence in layout order, or a name -> tensor mapping)."""
        if isinstance(tensors, Mapping):
            tensors = [tensors[n] for n in self.names]
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, vector: Tensor) -> tuple[Tensor, ...]:
        """Views of ``vector`` (last dim = ``numel``) shaped like each tensor.

        Leading batch dimensions are kept: a ``(k, numel)`` input gives ``(k, *shape)`` views.
        """
        if vector.shape[-1] != self.numel:
            raise ValueError(f"expected a vector of length {self.numel}, got {vector.shape[-1]}")
        batch = vector.shape[:-1]
        chunks = torch.split(vector, self.numels, dim=-1)
        return tuple(c.reshape(*batch, *s) for c, s in zip(chunks, self.shapes))

    def as_dict(self, vector: Tensor) -> dict[str, Tensor]:
        return dict(zip(self.names, self.unflatten(vector)))
