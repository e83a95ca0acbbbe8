"""Performance profiles, integrated score and speedups on hand-made tables."""

import math

import numpy as np
import pytest

from gradkit.bench import scoring

INF = math.inf
# 3 workloads x 3 optimizers (times to target; inf = missed)
TIMES = np.array([
    [10.0, 20.0, INF],   # ratios 1, 2, inf
    [30.0, 15.0, 60.0],  # ratios 2, 1, 4
    [50.0, 125.0, 40.0],  # ratios 1.25, 3.125, 1
])


def test_ratios_by_hand():
    want = np.array([[1, 2, INF], [2, 1, 4], [1.25, 3.125, 1]])
    np.testing.assert_allclose(scoring.performance_ratios(TIMES), want)


def test_workload_everyone_missed_gives_infinite_ratios():
    ratios = scoring.performance_ratios(np.array([[INF, INF], [1.0, 2.0]]))
    assert np.isinf(ratios[0]).all()
    np.testing.assert_allclose(ratios[1], [1, 2])


def test_rejects_non_positive_or_nan_times():
    with pytest.raises(ValueError, match="positive"):
        scoring.performance_ratios(np.array([[0.0, 1.0]]))
    with pytest.raises(ValueError):
        scoring.performance_ratios(np.array([[np.nan, 1.0]]))


def test_profile_by_hand():
    rho = scoring.performance_profile(scoring.performance_ratios(TIMES), [1.0, 2.0, 3.5, 4.0])
    want = np.array([
        [1 / 3, 3 / 3, 3 / 3, 3 / 3],  # ratios 1, 2, 1.25
        [1 / 3, 2 / 3, 3 / 3, 3 / 3],  # ratios 2, 1, 3.125
        [1 / 3, 1 / 3, 1 / 3, 2 / 3],  # ratios inf, 4, 1
    ])
    np.testing.assert_allclose(rho, want)


def test_integrated_score_by_hand():
    # each workload contributes (4 - max(r, 1)) / 3, averaged over the 3 workloads
    want = [
        ((4 - 1) + (4 - 2) + (4 - 1.25)) / 3 / 3,
        ((4 - 2) + (4 - 1) + (4 - 3.125)) / 3 / 3,
        (0 + 0 + (4 - 1)) / 3 / 3,
    ]
    got = scoring.integrated_score(scoring.performance_ratios(TIMES), tau_max=4.0)
    np.testing.assert_allclose(got, want)


def test_integrated_score_equals_numerical_area_under_profile():
    rng = np.random.default_rng(0)
    times = rng.uniform(1, 10, size=(7, 4))
    times[rng.uniform(size=times.shape) < 0.2] = INF
    ratios = scoring.performance_ratios(times)
    taus = np.linspace(1, 4, 300_001)
    rho = scoring.performance_profile(ratios, taus)
    area = ((rho[:, 1:] + rho[:, :-1]) / 2 * np.diff(taus)).sum(axis=1) / 3
    np.testing.assert_allclose(scoring.integrated_score(ratios, 4.0), area, atol=1e-4)


def test_fastest_everywhere_scores_one_and_never_reaching_scores_zero():
    ratios = scoring.performance_ratios(np.array([[1.0, INF], [2.0, INF], [3.0, 100.0]]))
    score = scoring.integrated_score(ratios)
    assert score[0] == pytest.approx(1.0)
    assert score[1] == pytest.approx(0.0)


def test_speedups_and_geometric_mean_by_hand():
    times = np.array([
        [10.0, 20.0, 5.0],
        [40.0, 30.0, INF],
        [INF, INF, 8.0],
        [INF, INF, INF],
        [12.0, 24.0, 1.5],
    ])
    baseline = np.array([True, True, False])  # best of the first two columns
    got = scoring.speedups(times, baseline)
    want = np.array([
        [1.0, 0.5, 2.0],
        [0.75, 1.0, 0.0],
        [np.nan, np.nan, INF],
        [np.nan, np.nan, np.nan],
        [1.0, 0.5, 8.0],
    ])
    np.testing.assert_allclose(got, want)
    gm, used = scoring.geometric_mean_speedup(got)
    np.testing.assert_allclose(gm, [(1 * 0.75 * 1) ** (1 / 3), (0.5 * 1 * 0.5) ** (1 / 3), 4.0])
    np.testing.assert_array_equal(used, [3, 3, 2])


def test_speedups_without_baseline_are_undefined():
    assert np.isnan(scoring.speedups(np.ones((2, 2)), np.array([False, False]))).all()


def test_median_and_range_with_misses():
    assert scoring.median_and_range([3.0, 1.0, INF]) == (3.0, 1.0, INF)
    assert scoring.median_and_range([1.0, 2.0]) == (1.5, 1.0, 2.0)
    assert scoring.median_and_range([1.0, INF]) == (INF, 1.0, INF)
