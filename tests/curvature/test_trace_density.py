"""Known-answer tests 7 and 8 (docs/curvature.md): Hutchinson / Hutch++ on non-diagonal
matrices, SLQ density."""

import pytest
import torch

from gradkit.curvature import MatrixOperator, hutchinson_trace, hutchpp_trace, spectral_density
from tests.curvature._helpers import gen, with_spectrum

F64 = torch.float64


def decaying(n=150, seed=0):
    """Non-diagonal, a few large eigenvalues and a positive tail (Hessian-like)."""
    tail = 0.2 * torch.rand(n - 5, generator=gen(9))
    lam = torch.cat([torch.tensor([50.0, 30, 20, 10, 5]), tail])
    return with_spectrum(lam, seed)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_within_three_stderr_and_stderr_is_calibrated(distribution):
    A = with_spectrum(torch.linspace(-1.0, 4.0, 100))  # indefinite, non-diagonal
    truth = float(torch.trace(A))
    ests = [hutchinson_trace(MatrixOperator(A), 50, distribution=distribution,
                             generator=gen(s)) for s in range(40)]
    for e in ests[:10]:
        assert abs(e.estimate - truth) < 3 * e.stderr
        assert e.num_matvecs == 50
    spread = torch.tensor([e.estimate for e in ests]).std()
    mean_se = sum(e.stderr for e in ests) / len(ests)
    assert 0.7 < float(spread) / mean_se < 1.4
    if distribution == "rademacher":  # Var(z^T A z) = 2 (||A||_F^2 - sum_i A_ii^2)
        var = 2 * (float((A**2).sum()) - float((torch.diagonal(A) ** 2).sum()))
        samples = hutchinson_trace(MatrixOperator(A), 4000, generator=gen(1)).samples
        assert float(samples.var()) == pytest.approx(var, rel=0.1)


def test_hutchinson_converges():
    A = with_spectrum(torch.linspace(1.0, 2.0, 60))  # low variance: all eigenvalues alike
    est = hutchinson_trace(MatrixOperator(A), 20000, generator=gen(2))
    assert abs(est.estimate - float(torch.trace(A))) / float(torch.trace(A)) < 1e-3


def test_hutchpp_unbiased_within_three_stderr_and_beats_hutchinson():
    A = decaying()
    truth = float(torch.trace(A))
    op = MatrixOperator(A)
    hpp = [hutchpp_trace(op, 30, generator=gen(s)) for s in range(30)]
    hut = [hutchinson_trace(op, 30, generator=gen(s)) for s in range(30)]
    for e in hpp[:10]:
        assert abs(e.estimate - truth) < 3 * e.stderr
        assert e.num_matvecs == 30
    rms = [(sum((e.estimate - truth) ** 2 for e in es) / len(es)) ** 0.5 for es in (hpp, hut)]
    assert rms[0] < 0.3 * rms[1]  # the 5 outliers are deflated exactly
    assert op.num_matvecs == 30 * 30 * 2


def test_hutchpp_converges_to_1e_3():
    A = decaying()
    est = hutchpp_trace(MatrixOperator(A), 300, generator=gen(4))
    assert abs(est.estimate - float(torch.trace(A))) / float(torch.trace(A)) < 1e-3
    full = hutchpp_trace(MatrixOperator(A), 3 * A.shape[0], generator=gen(4))
    assert full.estimate == pytest.approx(float(torch.trace(A)), rel=1e-10)  # sketch = span


def test_hutchpp_rejects_tiny_budget():
    with pytest.raises(ValueError, match="num_matvecs"):
        hutchpp_trace(MatrixOperator(torch.eye(5, dtype=F64)), 3)


def test_slq_weights_are_first_row_squares_and_match_moments():
    A = decaying(80)
    v0 = torch.randn(80, 2, generator=gen(3), dtype=F64)
    sd = spectral_density(A_op := MatrixOperator(A), 2, 8, v0=v0)
    torch.testing.assert_close(sd.weights.sum(dim=1), torch.ones(2, dtype=F64))
    assert A_op.num_matvecs == sd.num_matvecs == 16
    # Gauss quadrature with 8 nodes is exact for degree <= 15: sum w theta^p = u^T A^p u
    scale = float(torch.linalg.eigvalsh(A).max())
    for r in range(2):
        u = v0[:, r] / v0[:, r].norm()
        for p in range(8):
            quad = float((sd.weights[r] * (sd.nodes[r] / scale) ** p).sum())
            exact = float(u @ torch.linalg.matrix_power(A / scale, p) @ u)
            assert quad == pytest.approx(exact, rel=1e-8, abs=1e-12)


def test_slq_density_integrates_to_one_and_splits_two_clusters():
    n = 400
    jitter = 0.05 * torch.randn(n, generator=gen(5))
    lam = torch.cat([torch.ones(n // 2), 5 * torch.ones(n // 2)]) + jitter
    sd = spectral_density(MatrixOperator(with_spectrum(lam)), 10, 30, generator=gen(6))
    assert float(torch.trapezoid(sd.density, sd.grid)) == pytest.approx(1.0, abs=1e-3)
    low = sd.grid < 3
    mass_low = float(torch.trapezoid(sd.density[low], sd.grid[low]))
    assert mass_low == pytest.approx(0.5, abs=0.08)
    assert float(sd.nodes.min()) >= float(lam.min()) - 1e-9
    assert float(sd.nodes.max()) <= float(lam.max()) + 1e-9


def test_slq_reports_the_outliers_of_a_bulk():
    lam = torch.cat([torch.tensor([30.0, 20.0, 10.0]), torch.rand(497, generator=gen(7))])
    sd = spectral_density(MatrixOperator(with_spectrum(lam)), 3, 60, generator=gen(8))
    torch.testing.assert_close(sd.outliers, torch.tensor([30.0, 20.0, 10.0], dtype=F64),
                               rtol=1e-6, atol=0)


def test_slq_breakdown_on_few_distinct_eigenvalues():
    lam = torch.tensor([1.0] * 10 + [5.0] * 10)
    sd = spectral_density(MatrixOperator(with_spectrum(lam)), 2, 6, generator=gen(0))
    torch.testing.assert_close(sd.weights.sum(dim=1), torch.ones(2, dtype=F64))
    heavy = sd.nodes[sd.weights > 1e-8]
    assert torch.allclose(heavy[(heavy - 1).abs() < 0.5], torch.tensor(1.0, dtype=F64))
    assert float(torch.trapezoid(sd.density, sd.grid)) == pytest.approx(1.0, abs=1e-3)
