"""Learning-rate schedules: linear decay with warm-up, and schedule refinement from a
previous run's gradient norms (Defazio et al. 2023).

* :class:`LinearDecayLR` — warm-up then linear decay (an ``LRScheduler``);
* :class:`GradNormRecorder` — logs global ℓ2/ℓ1 gradient norms each step;
* :func:`refine_schedule` → :class:`RefinedSchedule`, run with :class:`RefinedLR`.
"""

from gradkit.schedules.linear import FactorLR, LinearDecayLR
from gradkit.schedules.recorder import GradNormRecorder
from gradkit.schedules.refine import RefinedLR, RefinedSchedule, median_smooth, refine_schedule

__all__ = [
    "FactorLR",
    "GradNormRecorder",
    "LinearDecayLR",
    "RefinedLR",
    "RefinedSchedule",
    "median_smooth",
    "refine_schedule",
]
