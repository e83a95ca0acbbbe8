"""Selection, performance profiles, integrated score, speedups, bootstrap intervals and shared
ranks on hand-made tables."""

import math
from types import SimpleNamespace

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


def test_speedups_without_baseline_are_undefined():
    assert np.isnan(scoring.speedups(np.ones((2, 2)), np.array([False, False]))).all()


def test_median_and_range_with_misses():
    assert scoring.median_and_range([3.0, 1.0, INF]) == (3.0, 1.0, INF)
    assert scoring.median_and_range([1.0, 2.0]) == (1.5, 1.0, 2.0)
    assert scoring.median_and_range([1.0, INF]) == (INF, 1.0, INF)


# ------------------------------------------------------------ geometric-mean speedup
BUDGET = np.array([100.0, 100.0, 100.0])


def test_geomean_counts_a_miss_at_the_budget_instead_of_leaving_it_out():
    times = np.array([
        [20.0, 10.0, 5.0],  # baseline 20; A 2x; B 4x
        [20.0, 20.0, INF],  # B misses: counts as 100 steps -> speedup 0.2
        [30.0, 30.0, INF],  # B misses: 0.3
    ])
    baseline = np.array([True, False, False])
    gm = scoring.geometric_mean_speedup(times, baseline, BUDGET)
    np.testing.assert_allclose(gm.value, [1.0, 2 ** (1 / 3), (4 * 0.2 * 0.3) ** (1 / 3)])
    np.testing.assert_array_equal(gm.n, [3, 3, 3])
    np.testing.assert_array_equal(gm.missed, [0, 0, 2])
    # B reached one target fast and missed two: it must not beat A, which reached all three
    assert gm.value[2] < gm.value[1]


def test_a_miss_contributes_no_more_than_reaching_at_the_end_of_the_budget():
    rng = np.random.default_rng(1)
    for _ in range(200):
        times = rng.uniform(1, 100, size=(4, 3))
        times[rng.uniform(size=times.shape) < 0.3] = INF
        baseline = np.array([True, False, False])
        before = scoring.geometric_mean_speedup(times, baseline, np.full(4, 100.0))
        w = rng.integers(4)
        if not np.isfinite(times[w, 2]):
            continue
        reached_late, missed = times.copy(), times.copy()
        reached_late[w, 2], missed[w, 2] = 100.0, INF
        late = scoring.geometric_mean_speedup(reached_late, baseline, np.full(4, 100.0))
        miss = scoring.geometric_mean_speedup(missed, baseline, np.full(4, 100.0))
        assert miss.value[2] <= before.value[2] + 1e-12
        assert miss.value[2] == pytest.approx(late.value[2])
        assert miss.missed[2] == before.missed[2] + 1


def test_geomean_censors_both_sides_at_the_budget_and_keeps_every_workload():
    times = np.array([
        [INF, INF],   # neither: 100 / 100 = 1
        [INF, 25.0],  # only the optimizer: budget / 25 = 4
        [10.0, 20.0],  # 0.5
    ])
    gm = scoring.geometric_mean_speedup(times, np.array([True, False]), BUDGET)
    np.testing.assert_allclose(gm.value, [1.0, (1 * 4 * 0.5) ** (1 / 3)])
    np.testing.assert_array_equal(gm.n, [3, 3])
    np.testing.assert_array_equal(gm.missed, [2, 1])


def test_geomean_without_baseline_or_with_a_budget_below_a_time_is_refused_or_undefined():
    gm = scoring.geometric_mean_speedup(np.ones((2, 2)), np.array([False, False]), np.ones(2))
    assert np.isnan(gm.value).all() and (gm.missed == 0).all()
    with pytest.raises(ValueError, match="budget"):
        scoring.geometric_mean_speedup(np.array([[5.0, 10.0]]), np.array([True, False]),
                                       np.array([8.0]))


# ------------------------------------------------------------------------- bootstrap
def test_bootstrap_is_seeded_and_resamples_each_cell_within_its_seeds():
    samples = [[[10.0, 30.0], [7.0]], [[INF, 5.0], []]]
    first = scoring.bootstrap(samples, lambda m: m.ravel(), n_boot=400, seed=3)
    again = scoring.bootstrap(samples, lambda m: m.ravel(), n_boot=400, seed=3)
    np.testing.assert_array_equal(first, again)
    assert set(first[:, 0]) == {10.0, 20.0, 30.0}  # medians of resampled pairs
    assert set(first[:, 1]) == {7.0}  # one seed: no spread
    assert set(first[:, 2]) == {5.0, INF}  # median of (5, inf) is inf
    assert set(first[:, 3]) == {INF}  # no trial: a miss
    other = scoring.bootstrap(samples, lambda m: m.ravel(), n_boot=400, seed=4)
    assert not np.array_equal(first, other)


def test_interval_is_percentile_based_and_nan_aware():
    reps = np.column_stack([np.arange(1.0, 1001.0), np.full(1000, np.nan)])
    low, high = scoring.interval(reps, 0.9)
    assert low[0] == pytest.approx(np.percentile(np.arange(1.0, 1001.0), 5))
    assert high[0] == pytest.approx(np.percentile(np.arange(1.0, 1001.0), 95))
    assert np.isnan(low[1]) and np.isnan(high[1])


# --------------------------------------------------------------------------- ranks
def test_overlapping_intervals_or_equal_scores_share_a_rank():
    scores = np.array([0.9, 0.8, 0.5, 0.5, 0.1])
    low = np.array([0.85, 0.5, 0.45, 0.5, 0.05])
    high = np.array([0.95, 0.86, 0.55, 0.5, 0.15])
    # 0.8 overlaps the leader 0.9 -> both rank 1; the 0.5s are clearly below 0.9 -> a new
    # group at position 3, and equal scores share it; 0.1 is clearly below 0.5's interval
    np.testing.assert_array_equal(scoring.shared_ranks(scores, low, high), [1, 1, 3, 3, 5])


def test_ranks_never_decrease_down_the_sorted_scores():
    # a lower score whose interval overlaps its group's leader must not outrank a higher one
    scores = np.array([0.367, 0.263, 0.25])
    low = np.array([0.333, 0.197, 0.16])
    high = np.array([0.427, 0.32, 0.333])
    np.testing.assert_array_equal(scoring.shared_ranks(scores, low, high), [1, 2, 2])
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = rng.uniform(size=6)
        half = rng.uniform(0, 0.2, size=6)
        ranks = scoring.shared_ranks(s, s - half, s + half)
        assert np.all(np.diff(ranks[np.argsort(-s)]) >= 0)


def test_equal_scores_at_printed_precision_tie_even_with_disjoint_intervals():
    ranks = scoring.shared_ranks(np.array([0.5001, 0.5002]), np.array([0.5001, 0.5002]),
                                 np.array([0.5001, 0.5002]))
    np.testing.assert_array_equal(ranks, [1, 1])
    ranks = scoring.shared_ranks(np.array([0.7, 0.5, np.nan]), np.array([0.7, 0.5, np.nan]),
                                 np.array([0.7, 0.5, np.nan]))
    np.testing.assert_array_equal(ranks, [1, 2, 3])


def test_round_sig():
    assert scoring.round_sig(0.012345) == 0.0123
    assert scoring.round_sig(12345.0) == 12300.0
    assert scoring.round_sig(-2.5551, 2) == -2.6
    assert scoring.round_sig(0.0) == 0.0 and math.isinf(scoring.round_sig(INF))


# ------------------------------------------------------------------------ selection
def _row(index, status="ok", steps=None, val=None):
    return SimpleNamespace(trial_index=index, status=status, steps_to_target=steps,
                           final_val_metric=val)


def test_selection_lives_in_scoring_and_orders_by_status_steps_val_index():
    rows = [_row(0, steps=None, val=0.99), _row(1, steps=40, val=0.90), _row(2, steps=30,
            val=0.80, status="diverged"), _row(3, steps=40, val=0.95)]
    assert scoring.select(rows, higher_is_better=True).trial_index == 3
    rows = [_row(0, val=0.5), _row(1, val=0.2), _row(2, status="failed")]
    assert scoring.select(rows, higher_is_better=False).trial_index == 1
    assert scoring.select([_row(1, val=0.3), _row(0, val=0.3)], True).trial_index == 0
