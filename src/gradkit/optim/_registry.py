"""Name -> optimizer class registry behind :func:`gradkit.optim.create`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

from gradkit.errors import UsageError

_REGISTRY: dict[str, Callable[..., torch.optim.Optimizer]] = {}

T = TypeVar("T")


def register(name: str, *, overwrite: bool = False) -> Callable[[T], T]:
    """Class decorator: make an optimizer available as ``create(name, ...)``."""
    key = name.lower()

    def decorator(factory: T) -> T:
        if key in _REGISTRY and not overwrite and _REGISTRY[key] is not factory:
            raise ValueError(f"optimizer name {name!r} is already registered")
        _REGISTRY[key] = factory  # type: ignore[assignment]
        return factory

    return decorator


def available() -> list[str]:
    """Sorted names accepted by :func:`create`."""
    return sorted(_REGISTRY)


def get(name: str) -> Callable[..., torch.optim.Optimizer]:
    """The optimizer class registered under ``name`` (case-insensitive)."""
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise UsageError(
            f"unknown optimizer {name!r}; valid names: {', '.join(available())}"
        ) from None


def create(name: str, params: Iterable[Any], **kwargs: Any) -> torch.optim.Optimizer:
    """Build a registered optimizer: ``create("diffgrad", model.parameters(), lr=1e-3)``."""
    return get(name)(params, **kwargs)


for _name, _cls in {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adagrad": torch.optim.Adagrad,
    "rmsprop": torch.optim.RMSprop,
    "nadam": torch.optim.NAdam,
}.items():
    register(_name)(_cls)
