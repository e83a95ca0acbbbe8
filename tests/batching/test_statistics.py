"""AdAdaGrad batch-size tests (methods.md §4): the spec's hand-computed KAT, a synthetic
problem with known covariance (closed-form next batch sizes), and a brute-force per-example
autograd cross-check on a tiny model (instruments.md KAT 18 pattern)."""

import math

import pytest
import torch
from torch import nn

from gradkit.autodiff import per_example_grads
from gradkit.batching import (
    augmented_inner_product_test,
    coordinate_test,
    gradient_statistics,
    inner_product_test,
    norm_test,
    orthogonality_test,
    run_test,
)

KAT = torch.tensor([[1.0, 0.0], [3.0, 0.0]])


def test_spec_known_answer():
    s = gradient_statistics(KAT)
    assert (s.mean_sq_norm, s.variance_trace, s.inner_product_variance) == (4.0, 2.0, 8.0)
    assert s.orthogonal_variance == 0.0
    d = norm_test(KAT, eta=0.5)
    assert (d.statistic, d.passed, d.next_batch_size) == (2.0, True, 2)
    d = norm_test(KAT, eta=0.1, max_batch_size=1000)
    assert d.statistic == pytest.approx(50.0) and not d.passed and d.next_batch_size == 50
    d = inner_product_test(KAT, theta=0.5)
    assert (d.statistic, d.passed, d.next_batch_size) == (2.0, True, 2)
    d = orthogonality_test(KAT, nu=0.1)
    assert (d.statistic, d.passed, d.next_batch_size) == (0.0, True, 2)
    d = augmented_inner_product_test(KAT, theta=0.5, nu=0.1)
    assert (d.statistic, d.next_batch_size) == (2.0, 2)
    d = augmented_inner_product_test(KAT, theta=0.05, nu=0.1, max_batch_size=1000)
    assert d.next_batch_size == 200  # inner product: 8 / (0.0025 · 16); orthogonality: 0
    # coordinate 0: Var 2 / ḡ² 4; coordinate 1 has no mean and no noise: skipped
    d = coordinate_test(KAT, eta=0.1, max_batch_size=1000)
    assert d.statistic == pytest.approx(50.0) and d.next_batch_size == 50


def test_input_forms_agree_and_sums_run_over_tensors():
    a, b = torch.randn(6, 2, 3), torch.randn(6, 4)
    flat = torch.cat([a.reshape(6, -1), b], 1)
    want = gradient_statistics(flat)
    for form in ({"w": a, "b": b}, [a, b], (a, b)):
        got = gradient_statistics(form)
        for field in ("mean_sq_norm", "variance_trace", "inner_product_variance",
                      "orthogonal_variance", "max_coordinate_ratio"):
            assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-12)
    # precomputed statistics are accepted by every test
    assert norm_test(want, 0.3).statistic == norm_test(flat, 0.3).statistic


def _synthetic(b, seed=0):
    """g_i = G + ξ_i, ξ ~ N(0, Σ), with Σ = L Lᵀ non-diagonal."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    L = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.8, 0, 0], [0.0, -0.3, 0.6, 0], [0.2, 0, 0.4, 1.2]],
                     dtype=torch.float64)
    xi = torch.randn(b, 4, generator=gen, dtype=torch.float64) @ L.T
    return G, L @ L.T, G + xi


def test_synthetic_known_covariance_closed_form_batch_sizes():
    b = 40_000
    G, S, grads = _synthetic(b)
    g2 = float(G @ G)
    gsg = float(G @ S @ G)
    tr = float(S.trace())
    eta = theta = nu = 0.2
    expected = {
        "norm": tr / (eta**2 * g2),
        "inner_product": gsg / (theta**2 * g2**2),
        "orthogonality": (tr - gsg / g2) / (nu**2 * g2),
        "coordinate": float((S.diagonal() / G**2).max()) / eta**2,
    }
    expected["augmented"] = max(expected["inner_product"], expected["orthogonality"])
    stats = gradient_statistics(grads)
    for test, r in expected.items():
        d = run_test(test, stats, eta=eta, theta=theta, nu=nu, batch_size=2,
                     max_batch_size=10**6)
        assert d.statistic == pytest.approx(r, rel=0.04), test
        assert abs(d.next_batch_size - math.ceil(r)) <= 0.04 * r + 1, test
        assert not d.passed


def test_brute_force_per_example_autograd_loop():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(9, 3, dtype=torch.float64), torch.randint(0, 2, (9,))
    loss_fn = nn.functional.cross_entropy
    # independent: one autograd call per example, flattened into a (B, D) list of rows
    rows = []
    for i in range(9):
        gs = torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]),
                                 list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    gm = torch.stack(rows)
    mean = gm.mean(0)
    var_trace = gm.var(0, unbiased=True).sum()
    ips = torch.stack([r @ mean for r in rows])
    perp = torch.stack([r - (r @ mean) / (mean @ mean) * mean for r in rows])
    got = gradient_statistics(per_example_grads(model, loss_fn, x, y))
    assert got.mean_sq_norm == pytest.approx(float(mean @ mean), rel=1e-12)
    assert got.variance_trace == pytest.approx(float(var_trace), rel=1e-12)
    assert got.inner_product_variance == pytest.approx(float(ips.var(unbiased=True)), rel=1e-10)
    assert got.orthogonal_variance == pytest.approx(float(perp.var(0).sum()), rel=1e-10)
    assert got.max_coordinate_ratio == pytest.approx(
        float((gm.var(0) / mean.square()).max()), rel=1e-10)
    # Cockpit-style values: the smallest threshold passing at b = 9
    b = 9
    assert got.norm_test_value() == pytest.approx(
        math.sqrt(float(((gm - mean) ** 2).sum()) / ((b - 1) * b * float(mean @ mean))))
    assert got.inner_product_test_value() == pytest.approx(
        math.sqrt(float(ips.var()) / (b * float(mean @ mean) ** 2)))
    assert got.orthogonality_test_value() == pytest.approx(
        math.sqrt(float((perp**2).sum()) / ((b - 1) * b * float(mean @ mean))))
    eta = got.norm_test_value()
    assert norm_test(got, eta * 1.001).passed and not norm_test(got, eta * 0.999).passed


def test_never_decreases_and_capped():
    d = norm_test(KAT, eta=0.5, batch_size=64)  # asks for 2
    assert d.next_batch_size == 64 and d.passed
    d = norm_test(KAT, eta=0.1, batch_size=8, max_batch_size=20)
    assert d.next_batch_size == 20 and not d.passed
    d = norm_test(KAT, eta=0.1, batch_size=32, max_batch_size=16)  # cap below b: keep b
    assert d.next_batch_size == 32


def test_zero_mean_gradient_guards():
    opposite = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])
    for test in ("norm", "inner_product", "orthogonality", "augmented"):
        assert run_test(test, opposite, max_batch_size=128).next_batch_size == 128
        with pytest.raises(ValueError, match="max_batch_size"):
            run_test(test, opposite)
    zeros = torch.zeros(4, 3)
    for test in ("norm", "inner_product", "orthogonality", "augmented", "coordinate"):
        d = run_test(test, zeros)
        assert d.statistic == 0.0 and d.passed and d.next_batch_size == 4


def test_coordinate_guard_and_eps():
    # coordinate 1 has zero mean but noise -> infinite requirement -> the cap
    g = torch.tensor([[2.0, 1.0], [2.0, -1.0]])
    assert coordinate_test(g, 0.5, max_batch_size=99).next_batch_size == 99
    # eps softens it: Var 2 / (0.25 · (0 + 1))
    assert coordinate_test(g, 0.5, eps=1.0, max_batch_size=99).statistic == pytest.approx(8.0)
    with pytest.raises(ValueError, match="eps"):
        coordinate_test(gradient_statistics(g), 0.5, eps=1.0)


def test_float32_input_accumulates_in_float64():
    g64 = torch.randn(50, 30, dtype=torch.float64) + 0.3
    a = gradient_statistics(g64.float())
    b = gradient_statistics(g64.float().double())
    assert a == b


@pytest.mark.parametrize("bad, match", [
    (torch.randn(1, 3), "at least 2"),
    (torch.randn(3), r"\(B, D\)"),
    ([torch.randn(3, 2), torch.randn(4, 2)], "leading batch dimension"),
    ({}, "no per-example"),
])
def test_bad_inputs(bad, match):
    with pytest.raises(ValueError, match=match):
        gradient_statistics(bad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="Invalid eta value: 0"):
        norm_test(KAT, eta=0)
    with pytest.raises(ValueError, match="Invalid theta value"):
        inner_product_test(KAT, theta=-1)
    with pytest.raises(ValueError, match="Invalid nu value"):
        orthogonality_test(KAT, nu=float("inf"))
    with pytest.raises(ValueError, match="Invalid test"):
        run_test("variance", KAT)
    with pytest.raises(ValueError, match="batch_size"):
        norm_test(KAT, batch_size=0)
    with pytest.raises(ValueError, match="max_batch_size"):
        norm_test(KAT, max_batch_size=0)


def test_statistics_read_the_shared_gradient_moments():
    """One owner (issue 11): the batch-size tests read the GradientMoments that coherence,
    noise scale and SNR read, whether given raw gradients or the moments themselves."""
    from gradkit.instruments import gradient_moments

    g = torch.randn(12, 7, dtype=torch.float64) + 0.5
    want = gradient_statistics(g)
    assert gradient_statistics(gradient_moments(g)) == want
    g32 = g.float()  # float32 reductions (the Monitor's) agree to float32 accuracy
    got = gradient_statistics(gradient_moments(g32))
    for field in ("mean_sq_norm", "variance_trace", "inner_product_variance",
                  "orthogonal_variance", "max_coordinate_ratio"):
        assert getattr(got, field) == pytest.approx(getattr(gradient_statistics(g32), field),
                                                    rel=1e-5)


def test_the_monitor_computes_per_example_moments_once_per_step(monkeypatch):
    import gradkit.batching.statistics as stats_module
    import gradkit.instruments.core as core
    from gradkit.instruments import (
        Coherence,
        GradientMoments,
        GradientSNR,
        GradientTests,
        Monitor,
        NoiseScale,
    )

    calls = []

    def counting(g, **kwargs):
        if not isinstance(g, GradientMoments):
            calls.append(1)
        return real(g, **kwargs)

    real = core.gradient_moments
    monkeypatch.setattr(core, "gradient_moments", counting)
    monkeypatch.setattr(stats_module, "gradient_moments", counting)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    mon = Monitor(model, nn.functional.cross_entropy, instruments=[
        Coherence(), NoiseScale(), GradientSNR(), GradientTests()])
    mon.step((torch.randn(8, 3), torch.randint(0, 2, (8,))))
    mon.flush()
    assert len(calls) == 1
    assert {"m_coherence", "noise_scale", "grad_snr", "norm_test"} <= set(mon.history[0])
