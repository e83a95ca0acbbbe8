"""Optimizers from the optimization literature as ``torch.optim.Optimizer`` drop-ins.

``create(name, params, **kwargs)`` builds any registered optimizer (gradkit's and torch's);
``available()`` lists the names.
"""

from gradkit.optim._registry import available, create, get, register

__all__ = ["available", "create", "get", "register"]

# Each optimizer module registers itself on import; add new modules below.
# --- wave 1 (issue: foundation) ---
# --- wave 2 (issue: Muon, AdaGrad-Norm, PerpGrad, M3, SAM, ...) ---
