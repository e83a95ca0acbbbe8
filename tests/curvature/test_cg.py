"""Conjugate gradient against torch.linalg.solve."""

import pytest
import torch

from gradkit.curvature import MatrixOperator, conjugate_gradient

F64 = torch.float64


def spd(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g, dtype=F64)
    scales = torch.logspace(0, 3, n, dtype=F64)  # badly scaled rows: Jacobi helps
    A = B @ B.T / n + torch.eye(n, dtype=F64)
    return scales.sqrt()[:, None] * A * scales.sqrt()[None, :], torch.randn(n, generator=g,
                                                                          dtype=F64)


def test_cg_solves_spd_system():
    A, b = spd()
    x, info = conjugate_gradient(MatrixOperator(A), b, tol=1e-10, maxiter=2000)
    assert info.converged and info.residual_norm <= 1e-10 * float(b.norm())
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-7, atol=1e-9)


def test_cg_damping_and_jacobi_preconditioner():
    A, b = spd()
    lam = 0.5
    truth = torch.linalg.solve(A + lam * torch.eye(A.shape[0], dtype=F64), b)
    x1, plain = conjugate_gradient(MatrixOperator(A), b, damping=lam, tol=1e-10, maxiter=2000)
    diag = torch.diagonal(A) + lam
    x2, jac = conjugate_gradient(MatrixOperator(A), b, damping=lam, tol=1e-10, maxiter=2000,
                                 preconditioner=diag)
    x3, call = conjugate_gradient(MatrixOperator(A), b, damping=lam, tol=1e-10, maxiter=2000,
                                  preconditioner=lambda r: r / diag)
    for x in (x1, x2, x3):
        torch.testing.assert_close(x, truth, rtol=1e-7, atol=1e-9)
    assert jac.iterations < plain.iterations
    assert call.iterations == jac.iterations


def test_cg_x0_maxiter_and_negative_curvature():
    A, b = spd(20)
    truth = torch.linalg.solve(A, b)
    _, info = conjugate_gradient(MatrixOperator(A), b, x0=truth, tol=1e-8)
    assert info.iterations == 0 and info.converged
    _, info = conjugate_gradient(MatrixOperator(A), b, maxiter=2, tol=1e-12)
    assert not info.converged and info.iterations == 2
    indefinite = MatrixOperator(torch.diag(torch.tensor([1.0, -1.0], dtype=F64)))
    _, info = conjugate_gradient(indefinite, torch.tensor([1.0, 1.0], dtype=F64))
    assert info.negative_curvature and not info.converged
    with pytest.raises(ValueError, match="Invalid damping"):
        conjugate_gradient(MatrixOperator(A), b, damping=-1.0)
