"""Shared base for optimizers that wrap another one (PerpGrad, SAM).

A wrapper is a real ``torch.optim.Optimizer`` (so lr schedulers accept it) whose
``param_groups`` and ``state`` ARE the inner optimizer's objects: a scheduler changing
``wrapper.param_groups[i]["lr"]`` changes the inner lr, and ``wrapper.state[p]`` is the inner
state. The wrapper's own hyperparameters (e.g. SAM's ``rho``) are added to the inner groups
with ``setdefault``, so they can be overridden per group and are saved in ``state_dict``.
"""

from __future__ import annotations

from typing import Any

import torch

from gradkit.optim._registry import create


def build_base(params: Any, base: str | type | torch.optim.Optimizer,
               base_kwargs: dict[str, Any], wrapper: str) -> torch.optim.Optimizer:
    """The inner optimizer: given as an instance, a class, or a registry name."""
    if isinstance(base, torch.optim.Optimizer):
        if params is not None and params is not base:
            raise ValueError(f"{wrapper}: pass either params with base=<name or class>, or an "
                             "optimizer instance as base (then params=None), not both")
        if base_kwargs:
            raise ValueError(f"{wrapper}: keyword arguments {sorted(base_kwargs)} cannot be "
                             "applied to an existing optimizer instance")
        return base
    if isinstance(params, torch.optim.Optimizer):
        raise ValueError(f"{wrapper}: to wrap an existing optimizer pass it as base=")
    if isinstance(base, str):
        return create(base, params, **base_kwargs)
    if isinstance(base, type) and issubclass(base, torch.optim.Optimizer):
        return base(params, **base_kwargs)
    raise ValueError(f"Invalid base value: {base!r} (use a registry name, an Optimizer class or "
                     "an Optimizer instance)")


class WrapperOptimizer(torch.optim.Optimizer):
    """Base class: ``self.base`` is the inner optimizer; groups and state are shared live.

    Subclasses call ``super().__init__(base, own_defaults)`` and implement ``step``.
    ``load_state_dict`` delegates to the inner optimizer and re-links the shared objects.
    """

    def __init__(self, base: torch.optim.Optimizer, defaults: dict[str, Any]) -> None:
        self.base = base
        self._own_defaults = dict(defaults)
        self._linked = False
        # Registers every inner group dict (same objects) and fills in our defaults.
        super().__init__(base.param_groups, {**base.defaults, **defaults})
        self._link()

    def _link(self) -> None:
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self._linked = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not self._linked:  # during __init__: the inner groups themselves
            super().add_param_group(param_group)
            return
        self.base.add_param_group(param_group)
        for key, value in self._own_defaults.items():
            self.base.param_groups[-1].setdefault(key, value)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict)
        self._link()
        # a checkpoint from before one of our options existed: its default (torch's
        # __setstate__ + setdefault convention; the base optimizer does the same for its own)
        for group in self.param_groups:
            for key, value in self._own_defaults.items():
                group.setdefault(key, value)

    def __getstate__(self) -> dict[str, Any]:
        # torch's __getstate__ keeps only defaults/state/param_groups; keep ``base`` too so
        # deepcopy/pickle give a working wrapper (shared objects stay shared in the copy).
        return self.__dict__.copy()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base!r})"
