r"""Learning-rate schedule refinement from a previous run's gradient norms.

Defazio, Cutkosky, Mehta & Mishchenko, "When, Why and How Much? Adaptive Learning Rate
Scheduling by Refinement" (arXiv 2310.07831; later "Optimal Linear Decay Learning Rate
Schedules and Further Refinements"). Reference code matched:
``facebookresearch/adaptive_scheduling`` (``find_schedule.py``: ``find_closed_form_schedule``;
``visual.py``: smoothing).

Given per-step gradient norms :math:`G_1, \dots, G_T` of a previous run:

.. math::
    \begin{aligned}
    w_t &= G_t^{-2} \quad(\texttt{norm="l2"}, \text{SGD}) \qquad
    w_t = \lVert g_t\rVert_1^{-1} \quad(\texttt{norm="l1"}, \text{Adam-type}) \\
    \eta_t &\propto w_t \sum_{p=t+1}^{T} w_p \quad (\eta_T = 0), \qquad
    \eta_t \leftarrow \eta_t / \max_s \eta_s
    \end{aligned}

The result multiplies the tuned peak lr (each param group's lr in :class:`RefinedLR`).
Constant norms give exact linear decay :math:`1 - t/(T-1)`.

Pipeline and the choices where the reference is ambiguous:

1. ``drop_first`` / ``drop_last`` samples are removed (default 0). The reference drops the
   first and last 2 samples because of its wandb-export artefacts, not as part of the
   method; pass ``drop_first=2, drop_last=2`` to reproduce it. Non-finite values (±inf, and
   NaN) and zeros (a zero norm has no finite weight) are dropped; negatives raise.
2. Smoothing (``tau > 0``): if the sequence has fewer than ``smoothing_points`` (10,000)
   samples it is first resampled to that many by linear interpolation (as the reference
   does); a median filter of odd width :math:`2\lfloor \tau N/2\rfloor + 1` over the
   :math:`N` samples is applied, the END padded with ``2·width`` samples by reflection (numpy
   ``"reflect"``, edge not repeated) and the start in ``"nearest"`` mode, then the padding is
   dropped. The window is thus a fraction τ of the run whatever its length (the reference's
   fixed 1001 samples equal τ = 0.1 only for 10,000-sample logs). ``tau = 0`` skips smoothing
   and is exact.
3. The (smoothed) norms are interpolated linearly onto ``n_points`` evenly spaced points
   (default: the number of cleaned samples), the schedule is computed on that grid and
   normalised to max 1. Grid point :math:`i` stands for the fraction :math:`i/(n-1)` of
   training; :class:`RefinedLR` interpolates it for a run of any length.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from scipy.ndimage import median_filter
from torch import Tensor
from torch.optim import Optimizer

from gradkit.schedules.linear import FactorLR, check_steps
from gradkit.schedules.recorder import GradNormRecorder

Norms = Sequence[float] | np.ndarray | Tensor | GradNormRecorder


@dataclass(frozen=True)
class RefinedSchedule:
    """Lr multipliers on an even grid over the run (``values[0]`` at the start,
    ``values[-1]`` at the last step). Call it with the fraction of training done."""

    values: tuple[float, ...]

    def __post_init__(self) -> None:
        vals = np.asarray(self.values, dtype=np.float64)
        if vals.ndim != 1 or vals.size < 2:
            raise ValueError("a schedule needs at least 2 values")
        if not (np.isfinite(vals).all() and (vals >= 0).all()):
            raise ValueError("schedule values must be finite and non-negative")
        object.__setattr__(self, "values", tuple(float(v) for v in vals))

    def __len__(self) -> int:
        return len(self.values)

    def __call__(self, fraction: float | np.ndarray) -> float | np.ndarray:
        """Multiplier at ``fraction`` ∈ [0, 1] of training (clipped), linearly interpolated."""
        grid = np.linspace(0.0, 1.0, len(self.values))
        out = np.interp(np.clip(fraction, 0.0, 1.0), grid, self.values)
        return float(out) if np.ndim(out) == 0 else out

    def at_step(self, step: int, total_steps: int) -> float:
        """Multiplier at optimizer step ``step`` (0-based) of a ``total_steps``-step run."""
        return self(min(step, total_steps - 1) / (total_steps - 1))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"values": list(self.values)}))

    @classmethod
    def load(cls, path: str | Path) -> RefinedSchedule:
        return cls(tuple(json.loads(Path(path).read_text())["values"]))


def _clean(norms: Norms, norm: str, drop_first: int, drop_last: int) -> np.ndarray:
    if isinstance(norms, GradNormRecorder):
        x = norms.norms(norm)
    elif isinstance(norms, Tensor):
        x = norms.detach().cpu().to(torch.float64).numpy()
    else:
        x = np.asarray(norms, dtype=np.float64)
    x = x.reshape(-1)
    for name, value in (("drop_first", drop_first), ("drop_last", drop_last)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"Invalid {name} value: {value!r} (must be a non-negative integer)")
    x = x[drop_first: x.size - drop_last]
    if ((x < 0) & np.isfinite(x)).any():
        raise ValueError("gradient norms must be non-negative")
    x = x[np.isfinite(x) & (x > 0)]
    if x.size < 2:
        raise ValueError(f"need at least 2 finite positive gradient norms, got {x.size}")
    return x


def _resample(x: np.ndarray, n: int) -> np.ndarray:
    if x.size == n:
        return x
    return np.interp(np.linspace(0.0, 1.0, n), np.linspace(0.0, 1.0, x.size), x)


def median_smooth(x: np.ndarray, tau: float, smoothing_points: int = 10_000) -> np.ndarray:
    """Median-filter ``x`` with a window of a fraction ``tau`` of its length (see module
    docstring, step 2); returns the filtered sequence on ``max(len(x), smoothing_points)``
    evenly spaced samples."""
    y = _resample(x, max(x.size, smoothing_points))
    width = 2 * math.floor(tau * y.size / 2) + 1
    if width == 1:
        return y
    padded = np.pad(y, (0, 2 * width), mode="reflect")
    return median_filter(padded, size=width, mode="nearest")[: y.size]


def refine_schedule(grad_norms: Norms, *, norm: Literal["l2", "l1"] = "l2", tau: float = 0.1,
                    n_points: int | None = None, drop_first: int = 0, drop_last: int = 0,
                    smoothing_points: int = 10_000) -> RefinedSchedule:
    """The refined schedule (max 1) from a previous run's per-step gradient norms.

    Args:
        grad_norms: the norms (ℓ2 for ``norm="l2"``, ℓ1 for ``norm="l1"``), or a
            :class:`GradNormRecorder` (its matching column is used).
        norm: ``"l2"`` (w = 1/G², SGD) or ``"l1"`` (w = 1/||g||₁, Adam-type).
        tau: median-filter window as a fraction of the run (0: no smoothing, exact).
        n_points: grid size of the returned schedule (default: number of cleaned samples).
        drop_first, drop_last: samples removed at each end before anything else.
        smoothing_points: sequences shorter than this are resampled to it before filtering.
    """
    if norm not in ("l2", "l1"):
        raise ValueError(f"Invalid norm: {norm!r} (use 'l2' or 'l1')")
    if not (0.0 <= tau <= 1.0):
        raise ValueError(f"Invalid tau value: {tau} (must be in [0, 1])")
    if n_points is not None and (isinstance(n_points, bool) or not isinstance(n_points, int)
                                 or n_points < 2):
        raise ValueError(f"Invalid n_points value: {n_points!r} (must be an integer >= 2)")
    x = _clean(grad_norms, norm, drop_first, drop_last)
    n = x.size if n_points is None else n_points
    if tau > 0:
        x = median_smooth(x, tau, smoothing_points)
    x = _resample(x, n)
    w = 1.0 / np.square(x) if norm == "l2" else 1.0 / x
    tail = np.cumsum(w[::-1])[::-1]  # Σ_{p >= t} w_p
    eta = w * np.append(tail[1:], 0.0)  # w_t Σ_{p > t} w_p
    return RefinedSchedule(tuple(eta / eta.max()))


class RefinedLR(FactorLR):
    """Follow a refined schedule over a run of ``total_steps`` optimizer steps.

    ``lr = base_lr * schedule(t / (total_steps - 1))`` at step ``t`` (interpolated; the
    last value is held after the end).

    Args:
        optimizer: wrapped optimizer; each group's current lr is its peak lr.
        schedule: a :class:`RefinedSchedule` or a sequence of multipliers on an even grid.
        total_steps: steps of the new run (may differ from the recorded run).
        last_epoch: as in torch's schedulers.
    """

    def __init__(self, optimizer: Optimizer, schedule: RefinedSchedule | Sequence[float],
                 total_steps: int, last_epoch: int = -1) -> None:
        check_steps(total_steps)
        if not isinstance(schedule, RefinedSchedule):
            schedule = RefinedSchedule(tuple(schedule))
        self.schedule_values = schedule.values  # plain floats: state_dict is weights_only-safe
        self.total_steps = total_steps
        self._values: np.ndarray | None = None  # cache, not saved
        super().__init__(optimizer, last_epoch)

    @property
    def schedule(self) -> RefinedSchedule:
        return RefinedSchedule(self.schedule_values)

    def factor(self, step: int) -> float:
        if self._values is None:
            self._values = np.asarray(self.schedule_values, dtype=np.float64)
        vals = self._values
        position = min(step, self.total_steps - 1) / (self.total_steps - 1) * (vals.size - 1)
        i = min(int(position), vals.size - 2)
        return float(vals[i] + (position - i) * (vals[i + 1] - vals[i]))

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.pop("_values", None)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._values = None
