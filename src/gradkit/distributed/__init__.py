"""gradkit.distributed: robust aggregation, Byzantine attacks and multi-worker training.

* :mod:`gradkit.distributed.aggregators`: ``Aggregator`` (``agg(X) -> (d,)`` on an (n, d)
  tensor of worker vectors), ``PreAggregator`` (``pre(X) -> (m, d)``), composed with ``>>``:
  ``NNM(f=1) >> Krum(f=1)``. Rules: Mean, CoordinateMedian, TrimmedMean, GeometricMedian,
  Krum, MultiKrum, CenteredClipping, MDA, MoNNA, FlagAggregator; pre-aggregators NNM,
  Bucketing, Clipping, ARC, DropNonFinite.
* :mod:`gradkit.distributed.attacks`: ``attack(H) -> (d,)`` from the honest vectors H:
  SignFlipping, InnerProductManipulation, ALittleIsEnough, Mimic, Gaussian, Inf,
  LabelFlipping.
* :mod:`gradkit.distributed.simulator`: n workers in one process, deterministic under a seed;
  :func:`~gradkit.distributed.simulator.worker_gradient` is the per-worker computation the
  distributed runtimes share.
* :mod:`gradkit.distributed.coding`: gradient codes (fractional and cyclic repetition) and
  sequential gradient coding; :mod:`gradkit.distributed.stragglers`: delay models.
* :mod:`gradkit.distributed.ddp`: robust aggregation under torchrun (a DDP communication hook
  for coordinate-wise rules, an all-gather of the flat gradient for whole-vector rules).
* :mod:`gradkit.distributed.ray_runtime`: a Ray actor parameter server (``gradkit[ray]``).

Submodules are imported lazily (``import gradkit.distributed`` costs nothing).
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = {
    "aggregators", "attacks", "simulator", "coding", "stragglers", "ddp", "ray_runtime",
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"gradkit.distributed.{name}")
    raise AttributeError(f"module 'gradkit.distributed' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES)
