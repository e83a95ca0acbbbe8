"""Newton–Schulz orthogonalisation (NS5) as used by Muon, written once and batched.

Given a matrix (or a batch ``(..., m, n)`` of matrices) ``G = U S Vᵀ``, five iterations of the
odd quintic ``φ(σ) = aσ + bσ³ + cσ⁵`` with ``(a, b, c) = (3.4445, −4.7750, 2.0315)`` on the
Frobenius-normalised input map every singular value into roughly ``[0.7, 1.2]``, so the result
is ``U S' Vᵀ ≈ U Vᵀ`` (Jordan et al., 2024; reference ``KellerJordan/Muon`` ``muon.py``):

.. math::
    \\begin{aligned}
        &X \\leftarrow G / (\\lVert G \\rVert_F + 10^{-7})
            \\quad (\\text{transposed first when } m > n)\\\\
        &\\textbf{repeat } 5 \\textbf{ times: } A \\leftarrow X X^\\top,\\;
            B \\leftarrow bA + cA^2,\\; X \\leftarrow aX + BX
    \\end{aligned}

The reference runs in bfloat16; ``dtype`` selects the working precision (float32 / float64 for
tests and exact work). The result is returned in the working dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

NS5_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def resolve_ns_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` / ``torch.bfloat16`` / ... -> the torch dtype (ValueError otherwise)."""
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"Invalid ns_dtype value: {dtype!r} (use one of {sorted(_DTYPES)})")


def ns_dtype_name(dtype: str | torch.dtype) -> str:
    """Canonical string name of a working dtype (what optimizers keep in ``defaults``)."""
    resolved = resolve_ns_dtype(dtype)
    return next(name for name, value in _DTYPES.items() if value == resolved)


def newton_schulz5(
    G: Tensor,
    steps: int = 5,
    *,
    dtype: str | torch.dtype = torch.bfloat16,
    eps: float = 1e-7,
    coefficients: tuple[float, float, float] = NS5_COEFFICIENTS,
) -> Tensor:
    """Approximate orthogonalisation ``U Vᵀ`` of ``G`` (shape ``(..., m, n)``, batched).

    Args:
        G: matrix or batch of matrices (at least 2-D).
        steps: number of quintic iterations (5 in Muon).
        dtype: working dtype (``"bfloat16"`` like the reference, or float32/float64).
        eps: added to the Frobenius norm of each matrix before normalising.
        coefficients: ``(a, b, c)`` of the quintic.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz5 needs a (..., m, n) tensor, got shape {tuple(G.shape)}")
    a, b, c = coefficients
    X = G.to(resolve_ns_dtype(dtype))
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if transposed else X
