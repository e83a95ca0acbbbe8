"""Benchmark workloads: built-in problems and the protocol a user workload follows.

See :mod:`gradkit.bench.workloads.base` for the protocol. Built-in names: ``quadratic``,
``rosenbrock``, ``logreg``, ``mlp``, ``cnn``, ``char-lm``, ``transformer``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from gradkit.bench._imports import is_import_spec, load_attr
from gradkit.bench.workloads.base import (
    ArrayProblem,
    Arrays,
    ArrayWorkload,
    Problem,
    Workload,
    describe,
    reached,
    validate,
)
from gradkit.bench.workloads.modular import ModularAddition
from gradkit.bench.workloads.sklearn_tasks import DigitsCNN, DigitsMLP, LogisticRegression
from gradkit.bench.workloads.synthetic import NoisyQuadratic, Rosenbrock
from gradkit.bench.workloads.text import CharLM
from gradkit.errors import UsageError

BUILTIN: dict[str, Callable[..., Workload]] = {
    "quadratic": NoisyQuadratic,
    "rosenbrock": Rosenbrock,
    "logreg": LogisticRegression,
    "mlp": DigitsMLP,
    "cnn": DigitsCNN,
    "transformer": ModularAddition,
    "char-lm": CharLM,
}

_CACHE: dict[tuple[str, str], Workload] = {}


def resolve_workload(spec: str, overrides: dict[str, Any] | None = None) -> Workload:
    """A built-in workload by name (with size ``overrides``) or a user one by ``module:factory``.

    Results are cached per process, so datasets load once per worker.
    """
    cache_key = (spec, json.dumps(overrides or {}, sort_keys=True))
    if cache_key in _CACHE:
        return _CACHE[cache_key]
    if is_import_spec(spec):
        obj = load_attr(spec, "workload")
        if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "setup")):
            try:
                obj = obj()
            except Exception as exc:
                raise UsageError(
                    f"workload {spec!r}: calling the factory raised {type(exc).__name__}: {exc}"
                ) from None
        workload = validate(obj, spec)
    else:
        if spec not in BUILTIN:
            raise UsageError(
                f"unknown workload {spec!r}; valid: {', '.join(BUILTIN)} "
                "or package.module:factory"
            )
        workload = validate(BUILTIN[spec](**(overrides or {})), spec)
    _CACHE[cache_key] = workload
    return workload


__all__ = [
    "BUILTIN", "ArrayProblem", "ArrayWorkload", "Arrays", "Problem", "Workload", "describe",
    "reached", "resolve_workload", "validate",
]
