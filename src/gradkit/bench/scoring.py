r"""Scoring, separate from running (AlgoPerf ``scoring/performance_profile.py`` style).

All functions take a ``(workloads × optimizers)`` array of times to target (steps or seconds;
``inf`` = target missed or diverged) and return plain arrays.

* Performance ratio: :math:`r_{w,o} = t_{w,o} / \min_{o'} t_{w,o'}` (``inf`` if ``o`` missed
  or if every optimizer missed workload ``w``).
* Performance profile: :math:`\rho_o(\tau) = \frac{1}{|W|}\,\#\{w : r_{w,o} \le \tau\}`.
* Integrated score (AlgoPerf's benchmark score, linear :math:`\tau`):
  :math:`B_o = \frac{1}{\tau_{max}-1}\int_1^{\tau_{max}} \rho_o(\tau)\,d\tau`, computed exactly
  (ρ is a step function): each workload contributes
  :math:`\max(0, \tau_{max} - r_{w,o}) / (\tau_{max} - 1) / |W|`. 1 = fastest everywhere.
* Speedup over the baseline: :math:`s_{w,o} = t_{w,b} / t_{w,o}` with :math:`t_{w,b}` the best
  baseline (torch.optim) time; ``inf`` if only ``o`` reached the target, ``0`` if ``o`` missed
  it, NaN if both missed. The geometric-mean speedup uses the workloads where both reached it.
"""

from __future__ import annotations

import numpy as np

TAU_MAX = 4.0


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


def speedups(times: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """``(workloads × optimizers)`` speedups over the best baseline column per workload."""
    times = np.asarray(times, dtype=float)
    baseline = np.asarray(baseline, dtype=bool)
    if not baseline.any():
        return np.full(times.shape, np.nan)
    base = times[:, baseline].min(axis=1, keepdims=True).repeat(times.shape[1], axis=1)
    out = np.full(times.shape, np.nan)
    both = np.isfinite(base) & np.isfinite(times)
    out[both] = base[both] / times[both]
    out[~np.isfinite(base) & np.isfinite(times)] = np.inf
    out[np.isfinite(base) & ~np.isfinite(times)] = 0.0
    return out


def geometric_mean_speedup(speedup: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per optimizer: geometric mean over finite positive speedups, and how many were used."""
    speedup = np.asarray(speedup, dtype=float)
    ok = np.isfinite(speedup) & (speedup > 0)
    logs = np.where(ok, np.log(np.where(ok, speedup, 1.0)), 0.0)
    count = ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        gm = np.where(count > 0, np.exp(logs.sum(axis=0) / np.maximum(count, 1)), np.nan)
    return gm, count


def median_and_range(values: list[float]) -> tuple[float, float, float]:
    """Median, min and max (``inf`` entries allowed; NaN if empty)."""
    if not values:
        return (np.nan, np.nan, np.nan)
    arr = np.sort(np.asarray(values, dtype=float))
    n = len(arr)
    mid = arr[n // 2] if n % 2 else (arr[n // 2 - 1] + arr[n // 2]) / 2
    return float(mid), float(arr[0]), float(arr[-1])
