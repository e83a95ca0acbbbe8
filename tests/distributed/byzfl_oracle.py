"""ByzFL (``pip install --no-deps byzfl``, done by ``make test``) as a test oracle.

ByzFL's package ``__init__`` also imports its federated-learning framework, which needs
torchvision; its aggregators, pre-aggregators and attacks need only torch, NumPy and SciPy.
:func:`load` imports just those three modules (a module object stands in for the package
so that its ``__init__`` does not run), and skips the calling test when byzfl is absent.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys
import types

import pytest


def load() -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    """``(aggregators, preaggregators, attacks)`` of ByzFL, or ``pytest.skip``."""
    if "byzfl" not in sys.modules:
        spec = importlib.util.find_spec("byzfl")
        if spec is None or spec.origin is None:
            pytest.skip("byzfl is not installed (pip install --no-deps byzfl)")
        package = types.ModuleType("byzfl")
        package.__path__ = [str(pathlib.Path(spec.origin).parent)]
        sys.modules["byzfl"] = package
    return (importlib.import_module("byzfl.aggregators.aggregators"),
            importlib.import_module("byzfl.aggregators.preaggregators"),
            importlib.import_module("byzfl.attacks.attacks"))
