"""gradkit: optimizers from the literature, curvature, training-dynamics instruments and
fair optimizer benchmarks for PyTorch.

Subpackages are imported lazily so that ``import gradkit`` stays cheap:
``gradkit.optim``, ``gradkit.curvature``, ``gradkit.instruments``, ``gradkit.bench``,
``gradkit.distributed``, ``gradkit.federated``, ``gradkit.implicit``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {
    "optim", "curvature", "instruments", "bench", "autodiff", "losses", "schedules", "batching",
    "distributed", "federated", "implicit",
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"gradkit.{name}")
    raise AttributeError(f"module 'gradkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES)
