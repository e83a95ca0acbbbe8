r"""Preconditioned conjugate gradient for :math:`(A + \lambda I)\,x = b`.

Hestenes & Stiefel (1952); preconditioned form as in Nocedal & Wright, *Numerical
Optimization*, Algorithm 5.3, with :math:`M \approx A + \lambda I`:

.. math::
    \begin{aligned}
        r_0 &= b - (A + \lambda I) x_0, \quad y_0 = M^{-1} r_0, \quad p_0 = y_0 \\
        \alpha_j &= \frac{r_j^\top y_j}{p_j^\top (A + \lambda I) p_j}, \quad
        x_{j+1} = x_j + \alpha_j p_j, \quad r_{j+1} = r_j - \alpha_j (A + \lambda I) p_j \\
        y_{j+1} &= M^{-1} r_{j+1}, \quad
        \beta_{j} = \frac{r_{j+1}^\top y_{j+1}}{r_j^\top y_j}, \quad
        p_{j+1} = y_{j+1} + \beta_j p_j \\
        \text{stop when } & \lVert r_j \rVert \le \mathrm{tol} \cdot \lVert b \rVert
    \end{aligned}

A direction of non-positive curvature (:math:`p^\top (A+\lambda I) p \le 0`, possible for an
indefinite Hessian) stops the iteration with ``converged=False`` and
``negative_curvature=True`` (the iterate so far is returned, as in Newton-CG).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gradkit.curvature._operator import LinearOperator


@dataclass
class CGInfo:
    """Diagnostics of :func:`conjugate_gradient`."""

    iterations: int  # = products with the operator after the initial residual
    residual_norm: float  # ||b - (A + damping I) x||, recursively updated
    converged: bool
    negative_curvature: bool = False


def conjugate_gradient(
    op: LinearOperator,
    b: Tensor,
    *,
    damping: float = 0.0,
    tol: float = 1e-6,
    maxiter: int | None = None,
    preconditioner: Callable[[Tensor], Tensor] | Tensor | None = None,
    x0: Tensor | None = None,
) -> tuple[Tensor, CGInfo]:
    """Solve ``(op + damping * I) x = b`` by (preconditioned) conjugate gradient.

    Args:
        op: a symmetric positive (semi)definite operator.
        b: right-hand side ``(n,)``.
        damping: Tikhonov/Levenberg-Marquardt shift ``lambda >= 0``.
        tol: relative residual tolerance.
        maxiter: iteration budget (default ``n``, at least 1).
        preconditioner: a callable ``r -> M^{-1} r``, or a 1-D tensor holding the diagonal
            of ``M`` (Jacobi: pass ``diag(A) + damping``), applied as ``r / M``.
        x0: starting point (default zeros).

    Returns:
        ``(x, info)`` with ``info`` a :class:`CGInfo`.

    Example::

        >>> import torch
        >>> from gradkit.curvature import MatrixOperator, conjugate_gradient
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> x, info = conjugate_gradient(MatrixOperator(A), b, tol=1e-12)
        >>> torch.allclose(A @ x, b), info.converged, info.iterations
        (True, True, 2)
    """
    n = op.shape[0]
    if b.shape != (n,):
        raise ValueError(f"expected b of shape ({n},), got {tuple(b.shape)}")
    if damping < 0:
        raise ValueError(f"Invalid damping: {damping}")
    if not tol > 0:
        raise ValueError(f"Invalid tol: {tol}")
    maxiter = max(n, 1) if maxiter is None else int(maxiter)
    if maxiter < 1:
        raise ValueError(f"Invalid maxiter: {maxiter}")
    if preconditioner is None:
        def precond(r: Tensor) -> Tensor:
            return r
    elif isinstance(preconditioner, Tensor):
        diag = preconditioner.to(dtype=op.dtype, device=op.device)
        if diag.shape != (n,) or bool((diag <= 0).any()):
            raise ValueError("a tensor preconditioner must be a positive diagonal of shape (n,)")

        def precond(r: Tensor) -> Tensor:
            return r / diag
    else:
        precond = preconditioner

    def apply(v: Tensor) -> Tensor:
        return op.matvec(v) + damping * v

    b = b.to(dtype=op.dtype, device=op.device)
    x = torch.zeros_like(b) if x0 is None else x0.to(dtype=op.dtype, device=op.device).clone()
    r = b - apply(x) if x0 is not None else b.clone()
    target = tol * float(b.norm())
    y = precond(r)
    p = y.clone()
    ry = r @ y
    res = float(r.norm())
    if res <= target:
        return x, CGInfo(0, res, True)
    for it in range(1, maxiter + 1):
        Ap = apply(p)
        curv = p @ Ap
        if curv <= 0:
            return x, CGInfo(it, res, False, negative_curvature=True)
        alpha = ry / curv
        x = x + alpha * p
        r = r - alpha * Ap
        res = float(r.norm())
        if res <= target:
            return x, CGInfo(it, res, True)
        y = precond(r)
        ry_next = r @ y
        p = y + (ry_next / ry) * p
        ry = ry_next
    return x, CGInfo(maxiter, res, False)
