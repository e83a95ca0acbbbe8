"""Random probes drawn from an explicit generator (the global RNG is never consumed)."""

from __future__ import annotations

import torch
from torch import Tensor


def resolve_generator(generator: torch.Generator | None) -> torch.Generator:
    """``generator`` itself, or a fresh CPU generator seeded from OS entropy."""
    if generator is not None:
        return generator
    fresh = torch.Generator()
    fresh.seed()
    return fresh


def randn(shape: tuple[int, ...], like: torch.dtype, device: torch.device,
          generator: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=like,
                       device=generator.device).to(device)


def rademacher(shape: tuple[int, ...], like: torch.dtype, device: torch.device,
               generator: torch.Generator) -> Tensor:
    signs = torch.randint(0, 2, shape, generator=generator, device=generator.device)
    return (signs * 2 - 1).to(dtype=like, device=device)
