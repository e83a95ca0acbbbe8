r"""Selection and scoring, separate from running (AlgoPerf ``scoring/`` style).

Imports neither torch nor the runner: ``gradkit report`` reads a database with numpy only.

**Selection** (:func:`select`): among a study's tuning trials, finished before
diverged/failed, then fewest steps to the validation target (a miss is infinite), then best
final validation metric, then lowest trial index.

**Scores.** The functions below take a ``(workloads × optimizers)`` array of times to target
(steps or seconds; ``inf`` = target missed or diverged) and return plain arrays.

* Performance ratio: :math:`r_{w,o} = t_{w,o} / \min_{o'} t_{w,o'}` (``inf`` if ``o`` missed
  or if every optimizer missed workload ``w``).
* Performance profile: :math:`\rho_o(\tau) = \frac{1}{|W|}\,\#\{w : r_{w,o} \le \tau\}`.
* Integrated score (AlgoPerf's benchmark score, linear :math:`\tau`):
  :math:`B_o = \frac{1}{\tau_{max}-1}\int_1^{\tau_{max}} \rho_o(\tau)\,d\tau`, computed exactly
  (ρ is a step function): each workload contributes
  :math:`\max(0, \tau_{max} - r_{w,o}) / (\tau_{max} - 1) / |W|`. 1 = fastest everywhere.
* Speedup over the baseline: :math:`s_{w,o} = t_{w,b} / t_{w,o}` with :math:`t_{w,b}` the best
  baseline (torch.optim) time on workload ``w`` (:func:`speedups`: ``inf`` if only ``o``
  reached the target, ``0`` if ``o`` missed it, NaN if both missed).

**Geometric-mean speedup and misses** (:func:`geometric_mean_speedup`). Leaving the misses out
would reward missing a target (an optimizer that only reaches the easy targets would look
fast). The rule is AlgoPerf's ``scoring/compute_speedups.py``: a missed target counts as the
whole budget :math:`T_w` of the workload, on both sides of the ratio, and every workload is
in the mean. So a miss contributes :math:`t_{w,b}/T_w`, exactly what reaching the target at
the very end of the budget would contribute and never more; a workload only the optimizer
reached contributes :math:`T_w/t_{w,o}`, a lower bound of its true advantage; a workload
neither reached contributes 1. Hence turning any reached target into a miss can only lower
the mean (leaving out the workloads neither reached would break that: dropping a term
:math:`T_w/t_{w,o} \ge 1` can raise the mean). The result carries ``missed``, which the
report prints next to the mean (``missed k of n``).

**Uncertainty** (:func:`bootstrap`). The seed reruns of each selected configuration are
resampled with replacement (each (workload, optimizer) cell on its own, the same number of
seeds as measured), the median time per cell is recomputed, and any statistic of the
resulting time matrix (scores, geometric-mean speedups) is evaluated on every replicate;
the 2.5 and 97.5 percentiles give a 95 % interval. The generator is seeded, so the report is
a deterministic function of the database. Tuning (which configuration was selected) is not
resampled: the intervals measure seed-to-seed noise of the selected configurations.

**Ranks with ties** (:func:`shared_ranks`). Optimizers are sorted by score (rounded to the 3
significant digits the report prints) and cut into groups from the top: an optimizer joins
the group above it unless it is *clearly worse* than that group's first (best) member, which
means a lower printed score *and* a bootstrap interval lying entirely below that member's.
Everyone in a group shares the rank of the group's first position (competition ranking:
1, 1, 3, ...). So equal scores and intervals that overlap the group leader's share a rank,
and ranks never decrease down the sorted table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

TAU_MAX = 4.0
#: Bootstrap replicates and seed of the report's intervals.
N_BOOTSTRAP = 1000
BOOTSTRAP_SEED = 0
#: Two-sided coverage of the bootstrap intervals.
CONFIDENCE = 0.95


# ------------------------------------------------------------------------------ selection
def selection_key(row: Any, higher_is_better: bool) -> tuple:
    """Sort key of a tuning trial (smaller is better).

    ``row`` has the outcome attributes ``status``, ``steps_to_target``, ``final_val_metric``
    and ``trial_index`` (a :class:`~gradkit.bench.records.TrialRecord`).
    """
    steps = row.steps_to_target
    val = row.final_val_metric
    val_rank = math.inf if val is None else (-val if higher_is_better else val)
    return (row.status != "ok", math.inf if steps is None else steps, val_rank,
            row.trial_index)


def select(rows: Sequence[Any], higher_is_better: bool) -> Any:
    """The winning tuning trial among ``rows`` (non-empty)."""
    return min(rows, key=lambda r: selection_key(r, higher_is_better))


# -------------------------------------------------------------------------------- scores
def performance_ratios(times: np.ndarray) -> np.ndarray:
    times = np.asarray(times, dtype=float)
    if np.any(times <= 0) or np.any(np.isnan(times)):
        raise ValueError("times to target must be positive (inf for a miss), without NaN")
    best = times.min(axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        ratios = times / best
    ratios[~np.isfinite(best).repeat(times.shape[1], axis=1)] = np.inf
    return ratios


def performance_profile(ratios: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """``(optimizers × len(taus))`` fractions of workloads with ratio ≤ τ."""
    ratios = np.asarray(ratios, dtype=float)
    taus = np.asarray(taus, dtype=float)
    return (ratios[:, :, None] <= taus[None, None, :]).mean(axis=0)


def integrated_score(ratios: np.ndarray, tau_max: float = TAU_MAX) -> np.ndarray:
    """Exact normalised area under ρ on ``[1, tau_max]``, per optimizer."""
    if not tau_max > 1:
        raise ValueError(f"tau_max must be > 1, got {tau_max}")
    ratios = np.asarray(ratios, dtype=float)
    area = np.clip(tau_max - np.maximum(ratios, 1.0), 0.0, None)
    return (area / (tau_max - 1.0)).mean(axis=0)


def score(times: np.ndarray) -> np.ndarray:
    """Integrated score per optimizer straight from times (NaN if there are no workloads)."""
    times = np.asarray(times, dtype=float)
    if times.shape[0] == 0:
        return np.full(times.shape[1], np.nan)
    return integrated_score(performance_ratios(times))


def _best_baseline(times: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    return times[:, baseline].min(axis=1, keepdims=True).repeat(times.shape[1], axis=1)


def speedups(times: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """``(workloads × optimizers)`` speedups over the best baseline column per workload."""
    times = np.asarray(times, dtype=float)
    baseline = np.asarray(baseline, dtype=bool)
    if not baseline.any():
        return np.full(times.shape, np.nan)
    base = _best_baseline(times, baseline)
    out = np.full(times.shape, np.nan)
    both = np.isfinite(base) & np.isfinite(times)
    out[both] = base[both] / times[both]
    out[~np.isfinite(base) & np.isfinite(times)] = np.inf
    out[np.isfinite(base) & ~np.isfinite(times)] = 0.0
    return out


@dataclass(frozen=True)
class GeomeanSpeedup:
    """Per optimizer: the geometric-mean speedup, workloads in the mean, workloads missed."""

    value: np.ndarray  # NaN if there is no baseline or no workload
    n: np.ndarray  # workloads in the mean (all of them)
    missed: np.ndarray  # of those, the workloads the optimizer missed (counted at the budget)


def geometric_mean_speedup(times: np.ndarray, baseline: np.ndarray,
                           budget: np.ndarray) -> GeomeanSpeedup:
    """Geometric mean over workloads of ``t_best_baseline / t_optimizer``, misses at budget.

    Args:
        times: ``(workloads × optimizers)`` times to target, ``inf`` for a miss.
        baseline: which optimizer columns are baselines (torch.optim classes).
        budget: per workload, the time a miss counts as (the step budget, or the longest
            full-budget training time measured); at least every finite time of its row.
    """
    times = np.asarray(times, dtype=float)
    baseline = np.asarray(baseline, dtype=bool)
    budget = np.asarray(budget, dtype=float)
    n_w, n_o = times.shape
    missed = (~np.isfinite(times)).sum(axis=0)
    if not baseline.any() or n_w == 0:
        return GeomeanSpeedup(np.full(n_o, np.nan), np.full(n_o, n_w), missed)
    if budget.shape != (n_w,) or np.any(~(budget > 0)) or np.any(
            np.where(np.isfinite(times), times, 0.0) > budget[:, None]):
        raise ValueError("budget must be positive, one per workload, and at least every "
                         "finite time to target of its workload")
    censored = np.where(np.isfinite(times), times, budget[:, None])
    base = _best_baseline(censored, baseline)
    value = np.exp((np.log(base) - np.log(censored)).mean(axis=0))
    return GeomeanSpeedup(value, np.full(n_o, n_w), missed)


def median_and_range(values: list[float]) -> tuple[float, float, float]:
    """Median, min and max (``inf`` entries allowed; NaN if empty)."""
    if not values:
        return (np.nan, np.nan, np.nan)
    arr = np.sort(np.asarray(values, dtype=float))
    n = len(arr)
    mid = arr[n // 2] if n % 2 else (arr[n // 2 - 1] + arr[n // 2]) / 2
    return float(mid), float(arr[0]), float(arr[-1])


# --------------------------------------------------------------------------- uncertainty
def bootstrap(samples: Sequence[Sequence[Sequence[float]]],
              statistic: Callable[[np.ndarray], np.ndarray],
              n_boot: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """Replicates of ``statistic(times)`` with each cell's seeds resampled.

    Args:
        samples: ``samples[w][o]`` the per-seed times to target of cell (w, o) (``inf`` for a
            miss); an empty cell is a miss in every replicate.
        statistic: maps a ``(workloads × optimizers)`` matrix of median times to a vector.
        n_boot: number of replicates.
        seed: seed of the generator (the cells are visited in order, so the replicates are a
            deterministic function of ``samples``).

    Returns:
        ``(n_boot × len(statistic(...)))`` array.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    n_w = len(samples)
    n_o = len(samples[0]) if n_w else 0
    medians = np.full((n_boot, n_w, n_o), np.inf)
    for w in range(n_w):
        for o in range(n_o):
            values = np.asarray(samples[w][o], dtype=float)
            if values.size:
                pick = rng.integers(0, values.size, size=(n_boot, values.size))
                medians[:, w, o] = np.median(values[pick], axis=1)
    return np.stack([np.asarray(statistic(m), dtype=float) for m in medians])


def interval(replicates: np.ndarray, confidence: float = CONFIDENCE
             ) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval per column of ``replicates`` (NaN-aware; NaN if all NaN)."""
    tail = 100 * (1 - confidence) / 2
    replicates = np.asarray(replicates, dtype=float)
    low, high = np.full(replicates.shape[1], np.nan), np.full(replicates.shape[1], np.nan)
    for j in range(replicates.shape[1]):
        column = replicates[:, j]
        column = column[~np.isnan(column)]
        if column.size:
            low[j], high[j] = np.percentile(column, [tail, 100 - tail])
    return low, high


def round_sig(value: float, digits: int = 3) -> float:
    """``value`` rounded to ``digits`` significant digits (non-finite values unchanged)."""
    value = float(value)
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def shared_ranks(scores: np.ndarray, low: np.ndarray, high: np.ndarray,
                 digits: int = 3) -> np.ndarray:
    """Competition ranks with ties (see the module docstring); higher scores are better.

    Args:
        scores: per optimizer (NaN ranks last).
        low, high: the bootstrap interval of each score (NaN: the score itself).
        digits: significant digits at which scores are compared.
    """
    scores = np.asarray(scores, dtype=float)
    shown = np.array([round_sig(s, digits) if np.isfinite(s) else -np.inf for s in scores])
    low = np.where(np.isnan(low), shown, low)
    high = np.where(np.isnan(high), shown, high)
    ranks = np.zeros(len(scores), dtype=int)
    leader = -1
    for position, j in enumerate(np.argsort(-shown, kind="stable")):
        if leader < 0 or (shown[j] < shown[leader] and high[j] < low[leader]):
            leader, rank = j, position + 1
        ranks[j] = rank
    return ranks
