"""KAT 13 (gradient noise scale), KAT 14 (coherence) and the gradient SNR."""

import math

import pytest
import torch

from gradkit.instruments import (
    NoiseScaleEMA,
    coherence,
    gradient_snr,
    noise_scale_per_example,
    noise_scale_two_batch,
)

# ---------------------------------------------------------------- coherence (KAT 14, §8)


def test_coherence_spec_examples():
    e = torch.eye(2, dtype=torch.float64)
    assert coherence(e).m_coherence == pytest.approx(1.0)  # [1,0], [0,1]
    assert coherence(torch.stack([e[0], e[0]])).m_coherence == pytest.approx(2.0)
    assert coherence(torch.stack([e[0], -e[0]])).m_coherence == pytest.approx(0.0)


@pytest.mark.parametrize("m", [3, 7])
def test_coherence_identical_orthogonal_and_opposing_pairs(m):
    g = torch.randn(11, dtype=torch.float64)
    same = coherence(g.repeat(m, 1))
    assert same.alpha == pytest.approx(1.0) and same.m_coherence == pytest.approx(m)
    q, _ = torch.linalg.qr(torch.randn(11, m, dtype=torch.float64))
    ortho = coherence(2.5 * q.T)  # pairwise orthogonal, equal norms
    assert ortho.alpha == pytest.approx(1 / m) and ortho.m_coherence == pytest.approx(1.0)
    rows = torch.randn(m, 11, dtype=torch.float64)
    pm = coherence(torch.cat([rows, -rows]))
    assert pm.alpha == pytest.approx(0.0, abs=1e-15) and pm.m == 2 * m


def test_coherence_equals_pairwise_definition_and_accepts_a_param_dict():
    g = torch.randn(6, 4, 3, dtype=torch.float64)
    b = torch.randn(6, 3, dtype=torch.float64)
    flat = torch.cat([g.reshape(6, -1), b], 1)
    gram = flat @ flat.T  # E_{i,j}<g_i, g_j> / E_i <g_i, g_i>
    alpha = float(gram.mean() / gram.diagonal().mean())
    got = coherence({"w": g, "b": b})
    assert got.alpha == pytest.approx(alpha, rel=1e-12)
    assert got.m_coherence == pytest.approx(6 * alpha, rel=1e-12)
    assert math.isnan(coherence(torch.zeros(3, 2)).alpha)


# ------------------------------------------------------------- noise scale (KAT 13)


def _synthetic(n_draws, batch, d=12, seed=0):
    """g_i = G + ξ_i, ξ ~ N(0, Σ) with Σ = A Aᵀ (non-diagonal): known |G|² and tr Σ."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(d, generator=gen, dtype=torch.float64)
    A = 0.7 * torch.randn(d, d, generator=gen, dtype=torch.float64)
    xi = torch.randn(n_draws, batch, d, generator=gen, dtype=torch.float64) @ A.T
    return G + xi, float(G @ G), float(torch.trace(A @ A.T))


def _assert_unbiased(estimates, truth):
    est = torch.tensor(estimates, dtype=torch.float64)
    stderr = float(est.std() / math.sqrt(est.numel()))
    assert abs(float(est.mean()) - truth) < 4 * stderr, (float(est.mean()), truth, stderr)
    return est


def test_two_batch_estimators_are_each_unbiased():
    b_small, b_big = 4, 32
    g, grad_sq, trace = _synthetic(3000, b_big)
    small = g[:, :b_small].mean(1)  # the big batch contains the small one, as in gpt-neox
    big = g.mean(1)
    ests = [noise_scale_two_batch(float(s @ s), float(b @ b), b_small, b_big)
            for s, b in zip(small, big)]
    _assert_unbiased([e.grad_sq for e in ests], grad_sq)
    _assert_unbiased([e.trace_cov for e in ests], trace)
    # the ratio is only consistent: the ratio of the averaged estimates converges
    num = sum(e.trace_cov for e in ests) / len(ests)
    den = sum(e.grad_sq for e in ests) / len(ests)
    assert num / den == pytest.approx(trace / grad_sq, rel=0.05)


def test_two_batch_formulas_against_expectations():
    # E‖G_B‖² = |G|² + trΣ/B exactly inverts to (|G|², trΣ)
    est = noise_scale_two_batch(2.0 + 8.0 / 4, 2.0 + 8.0 / 16, 4, 16)
    assert est.grad_sq == pytest.approx(2.0) and est.trace_cov == pytest.approx(8.0)
    assert est.b_simple == pytest.approx(4.0)
    with pytest.raises(ValueError, match="b_small"):
        noise_scale_two_batch(1.0, 1.0, 8, 8)


def test_per_example_estimator_unbiased_and_matches_direct_formula():
    g, grad_sq, trace = _synthetic(2000, 16, seed=1)
    ests = [noise_scale_per_example(b) for b in g]
    _assert_unbiased([e.grad_sq for e in ests], grad_sq)
    _assert_unbiased([e.trace_cov for e in ests], trace)
    b = g[0]  # direct formula: tr Σ̂ = Σ var_j (unbiased), |G|² = ‖ḡ‖² − tr Σ̂ / B
    tr = float(b.var(0, unbiased=True).sum())
    assert ests[0].trace_cov == pytest.approx(tr, rel=1e-12)
    assert ests[0].grad_sq == pytest.approx(float(b.mean(0) @ b.mean(0)) - tr / 16, rel=1e-12)
    # agrees with the two-batch estimator on average over the same draws
    two = [noise_scale_two_batch(float(x[:4].mean(0) @ x[:4].mean(0)),
                                 float(x.mean(0) @ x.mean(0)), 4, 16) for x in g]
    t_pe = sum(e.trace_cov for e in ests) / len(ests)
    t_tb = sum(e.trace_cov for e in two) / len(two)
    assert t_pe == pytest.approx(t_tb, rel=0.08)


def test_ema_smooths_numerator_and_denominator_separately():
    from gradkit.instruments.gradients import NoiseScale

    ema = NoiseScaleEMA(beta=0.5)
    seq = [NoiseScale(1.0, 10.0, 10.0), NoiseScale(-0.5, 2.0, -4.0), NoiseScale(2.0, 6.0, 3.0)]
    for s in seq:
        out = ema.update(s)
    g = t = 0.0
    for s in seq:
        g, t = 0.5 * g + 0.5 * s.grad_sq, 0.5 * t + 0.5 * s.trace_cov
    corr = 1 - 0.5**3
    assert out.grad_sq == pytest.approx(g / corr) and out.trace_cov == pytest.approx(t / corr)
    assert out.b_simple == pytest.approx(t / g)  # ratio of the EMAs, not the EMA of ratios
    assert ema.update(NoiseScale(float("nan"), 1.0, float("nan"))) == out  # skipped
    with pytest.raises(ValueError, match="beta"):
        NoiseScaleEMA(1.0)


# ------------------------------------------------------------------------- GSNR


def test_gradient_snr_is_mean_of_per_coordinate_mean_sq_over_variance():
    g = torch.randn(9, 5, dtype=torch.float64) + torch.arange(5.0, dtype=torch.float64)
    g[:, 2] = 3.0  # zero variance: excluded
    mean, var = g.mean(0), g.var(0, unbiased=True)
    keep = [0, 1, 3, 4]
    want = float((mean[keep] ** 2 / var[keep]).mean())
    assert gradient_snr({"a": g[:, :2], "b": g[:, 2:]}) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="2 examples"):
        gradient_snr(torch.ones(1, 3))


def test_float32_statistics_keep_their_digits_when_gradients_agree():
    # |G|² ≫ tr Σ / B: an uncentred float32 Σ‖gᵢ‖² − B‖ḡ‖² would be pure rounding noise
    gen = torch.Generator().manual_seed(2)
    g64 = torch.ones(64, 500, dtype=torch.float64) + 1e-3 * torch.randn(
        64, 500, generator=gen, dtype=torch.float64)
    g32 = g64.float()
    want = noise_scale_per_example(g32.double())
    got = noise_scale_per_example(g32)
    assert got.trace_cov == pytest.approx(want.trace_cov, rel=1e-4)
    assert got.grad_sq == pytest.approx(want.grad_sq, rel=1e-6)
    assert gradient_snr(g32) == pytest.approx(gradient_snr(g32.double()), rel=1e-3)
