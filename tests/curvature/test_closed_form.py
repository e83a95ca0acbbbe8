"""Known-answer tests 1-3 (docs/curvature.md): quadratic, linear regression, logistic/softmax
regression."""

import pytest
import torch
from torch import nn

from gradkit.curvature import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    hutchinson_trace,
    hutchpp_trace,
    hvp,
    lanczos,
    power_iteration,
    spectral_density,
)

F64 = torch.float64


class Theta(nn.Module):
    """A model whose output is its parameter vector (the input is ignored)."""

    def __init__(self, n):
        super().__init__()
        self.theta = nn.Parameter(torch.randn(n, dtype=F64))

    def forward(self, x):
        return self.theta


def quadratic(A, b):
    return lambda theta, _targets: 0.5 * theta @ A @ theta + b @ theta


def random_symmetric(n, eigenvalues, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return Q @ torch.diag(eigenvalues.to(F64)) @ Q.T


# --- KAT 1: quadratic ------------------------------------------------------------------
def test_quadratic_hessian_top_k_trace_and_slq_nodes():
    n = 12
    lam = torch.linspace(-4.0, 7.0, n, dtype=F64)
    A = random_symmetric(n, lam)
    b = torch.randn(n, dtype=F64)
    data = (torch.zeros(1, 1, dtype=F64), torch.zeros(1, dtype=F64))
    op = HessianOperator(Theta(n), quadratic(A, b), data)
    torch.testing.assert_close(op.to_dense(), A, rtol=1e-12, atol=1e-12)
    v = torch.randn(n, dtype=F64)
    torch.testing.assert_close(hvp(Theta(n), quadratic(A, b), *data, v), A @ v)
    vals, _ = lanczos(op, 3, tol=1e-10, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(vals, lam.flip(0)[:3])
    torch.testing.assert_close(hutchpp_trace(op, 3 * n, generator=torch.Generator()
                                             .manual_seed(0)).estimate, float(lam.sum()))
    sd = spectral_density(op, 3, 6, generator=torch.Generator().manual_seed(0))
    assert sd.nodes.min() >= lam[0] - 1e-9 and sd.nodes.max() <= lam[-1] + 1e-9


def test_power_iteration_returns_largest_magnitude_lanczos_largest_algebraic():
    A = random_symmetric(2, torch.tensor([-10.0, 3.0]))
    op = HessianOperator(Theta(2), quadratic(A, torch.zeros(2, dtype=F64)),
                         (torch.zeros(1, 1, dtype=F64), torch.zeros(1, dtype=F64)))
    g = torch.Generator().manual_seed(0)
    assert power_iteration(op, 1, tol=1e-8, generator=g)[0].item() == pytest.approx(-10.0)
    assert lanczos(op, 1, "largest", generator=g)[0].item() == pytest.approx(3.0)
    assert lanczos(op, 1, "smallest", generator=g)[0].item() == pytest.approx(-10.0)


# --- KAT 2: linear regression --------------------------------------------------------------
def test_linear_regression_mean_mse_no_bias():
    N, d = 40, 5
    X, y = torch.randn(N, d, dtype=F64), torch.randn(N, 1, dtype=F64)
    model = nn.Linear(d, 1, bias=False).double()
    H = HessianOperator(model, nn.functional.mse_loss, (X, y)).to_dense()
    torch.testing.assert_close(H, 2.0 / N * X.T @ X)


def test_linear_regression_sum_reduction_multi_output_is_kron():
    N, d, k = 30, 4, 3
    X, Y = torch.randn(N, d, dtype=F64), torch.randn(N, k, dtype=F64)
    model = nn.Linear(d, k, bias=False).double()

    def sum_mse(out, target):
        return ((out - target) ** 2).sum()

    H = HessianOperator(model, sum_mse, (X, Y)).to_dense()  # one batch: weight 1
    # vec(W) is row-major over W of shape (k, d): H = I_k (x) 2 X^T X
    torch.testing.assert_close(H, torch.kron(torch.eye(k, dtype=F64), 2 * X.T @ X))
    G = GGNOperator(model, sum_mse, (X, Y)).to_dense()
    torch.testing.assert_close(G, H)


# --- KAT 3: logistic and softmax regression ------------------------------------------------
def test_logistic_regression_closed_form_and_ggn_equals_hessian():
    N, d = 50, 4
    X = torch.randn(N, d, dtype=F64)
    y = torch.randint(0, 2, (N, 1)).to(F64)
    model = nn.Linear(d, 1, bias=False).double()
    loss = nn.functional.binary_cross_entropy_with_logits
    s = torch.sigmoid(X @ model.weight.detach().T).squeeze(1)
    expected = X.T @ torch.diag(s * (1 - s)) @ X / N
    H = HessianOperator(model, loss, (X, y)).to_dense()
    torch.testing.assert_close(H, expected)
    torch.testing.assert_close(GGNOperator(model, loss, (X, y)).to_dense(), expected)


def test_softmax_regression_closed_form_ggn_and_fisher():
    N, d, C = 25, 3, 4
    X, y = torch.randn(N, d, dtype=F64), torch.randint(0, C, (N,))
    model = nn.Linear(d, C, bias=False).double()
    loss = nn.functional.cross_entropy
    P = torch.softmax(X @ model.weight.detach().T, dim=1)
    expected = sum(torch.kron(torch.diag(p) - torch.outer(p, p), torch.outer(x, x))
                   for p, x in zip(P, X)) / N
    torch.testing.assert_close(HessianOperator(model, loss, (X, y)).to_dense(), expected)
    torch.testing.assert_close(GGNOperator(model, loss, (X, y)).to_dense(), expected)
    # empirical Fisher: g_i = (p_i - e_{y_i}) (x) x_i
    E = torch.nn.functional.one_hot(y, C).to(F64)
    G = torch.stack([torch.kron(p - e, x) for p, e, x in zip(P, E, X)])
    torch.testing.assert_close(EmpiricalFisherOperator(model, loss, (X, y)).to_dense(),
                               G.T @ G / N)


def test_hutchinson_on_quadratic_hessian_within_three_stderr():
    n = 30
    A = random_symmetric(n, torch.linspace(0.5, 3.0, n))
    op = HessianOperator(Theta(n), quadratic(A, torch.zeros(n, dtype=F64)),
                         (torch.zeros(1, 1, dtype=F64), torch.zeros(1, dtype=F64)))
    est = hutchinson_trace(op, 200, generator=torch.Generator().manual_seed(3))
    assert abs(est.estimate - float(torch.trace(A))) < 3 * est.stderr
