"""Curvature of a model's loss over a dataset, and algorithms on symmetric operators.

Operators (all :class:`LinearOperator`: ``op @ v``, ``op @ V``, ``to_dense()``,
``sandwich(d)``, ``num_matvecs``): :class:`HessianOperator`, :class:`GGNOperator`,
:class:`EmpiricalFisherOperator`, :class:`MatrixOperator`. Functional product: :func:`hvp`.
Algorithms: :func:`lanczos`, :func:`power_iteration`, :func:`hutchinson_trace`,
:func:`hutchpp_trace`, :func:`spectral_density`, :func:`conjugate_gradient`.
"""

from gradkit.curvature._data import NondeterministicError
from gradkit.curvature._operator import LinearOperator, MatrixOperator, SandwichOperator
from gradkit.curvature.cg import CGInfo, conjugate_gradient
from gradkit.curvature.density import SpectralDensity, spectral_density
from gradkit.curvature.hvp import hvp
from gradkit.curvature.lanczos import EigenInfo, lanczos, power_iteration
from gradkit.curvature.operators import (
    CurvatureOperator,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
)
from gradkit.curvature.trace import TraceEstimate, hutchinson_trace, hutchpp_trace

__all__ = [
    "CGInfo",
    "CurvatureOperator",
    "EigenInfo",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "LinearOperator",
    "MatrixOperator",
    "NondeterministicError",
    "SandwichOperator",
    "SpectralDensity",
    "TraceEstimate",
    "conjugate_gradient",
    "hutchinson_trace",
    "hutchpp_trace",
    "hvp",
    "lanczos",
    "power_iteration",
    "spectral_density",
]
