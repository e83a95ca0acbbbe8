"""gradkit.federated: federated optimisation in one process, over many clients.

* :mod:`gradkit.federated.partition`: IID, Dirichlet-α label skew and quantity skew splits.
* :mod:`gradkit.federated.participation`: full / uniform / Bernoulli (heterogeneous p)
  participation, and FedAU's online aggregation weights for unknown p.
* :mod:`gradkit.federated.algorithms`: the client rules FedAvg, FedProx and FedSpeed.
* :mod:`gradkit.federated.simulator`: :class:`FederatedSimulator`: local training with any
  torch optimizer (vectorised over clients with ``torch.func.vmap`` where it applies), a
  server torch optimizer on the pseudo-gradient (FedAvg, FedAvgM, FedAdam) and any
  :mod:`gradkit.distributed.aggregators` rule as the server's aggregation.
* :mod:`gradkit.federated.fedamd`: FedAMD (anchor sampling) on the same simulator.
* :mod:`gradkit.federated.asynchronous`: asynchronous aggregation with delays (Async,
  FedFix, FedBuff): schedules, weights, and training along a schedule.

Names are imported lazily (``import gradkit.federated`` costs nothing).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FederatedSimulator": "simulator",
    "FedAMD": "fedamd",
    "FedAvg": "algorithms",
    "FedProx": "algorithms",
    "FedSpeed": "algorithms",
    "Bernoulli": "participation",
    "FedAUWeights": "participation",
    "FullParticipation": "participation",
    "UniformSampling": "participation",
}
_SUBMODULES = {"algorithms", "asynchronous", "fedamd", "participation", "partition",
               "simulator"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"gradkit.federated.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"gradkit.federated.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'gradkit.federated' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES | set(_EXPORTS))
