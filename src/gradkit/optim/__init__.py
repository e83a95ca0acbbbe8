"""Optimizers from the optimization literature as ``torch.optim.Optimizer`` drop-ins.

``create(name, params, **kwargs)`` builds any registered optimizer (gradkit's and torch's);
``available()`` lists the names.
"""

from gradkit.optim._registry import available, create, get, register

# Each optimizer module registers itself on import.
# --- wave 1 (issue: foundation) ---
from gradkit.optim.adamp import SGDP, AdamP
from gradkit.optim.diffgrad import DiffGrad

# isort: split
# --- wave 2 (issue: Muon, AdaGrad-Norm, PerpGrad, M3, SAM, ...) ---
from gradkit.optim.adagrad_norm import AdaGradNorm
from gradkit.optim.coherent import (
    M3,
    RA3,
    RM3,
    winsorized_gradient,
    winsorized_grads,
)
from gradkit.optim.drop_muon import DropMuon, drop_muon_layer_groups
from gradkit.optim.muon import Muon, muon_param_groups
from gradkit.optim.newton_schulz import newton_schulz5
from gradkit.optim.perpgrad import PerpGrad
from gradkit.optim.sam import SAM

# isort: split
# --- wave 3 (issue 15: M-FAC, zeroth-order) ---
from gradkit.optim.mezo import MeZO
from gradkit.optim.mfac import MFAC, MFACInverse
from gradkit.optim.qzo import QZO, QuantizedLinear, quantize_int8
from gradkit.optim.zo2 import ZO2

__all__ = [
    "M3", "MFAC", "QZO", "RA3", "RM3", "SAM", "SGDP", "ZO2", "AdaGradNorm", "AdamP", "DiffGrad",
    "DropMuon", "MFACInverse", "MeZO", "Muon", "PerpGrad", "QuantizedLinear", "available",
    "create", "drop_muon_layer_groups", "get", "muon_param_groups", "newton_schulz5",
    "quantize_int8", "register", "winsorized_gradient", "winsorized_grads",
]
