"""Declared search spaces and seeded quasi-random sampling (scrambled Halton).

Every optimizer gets the same *style* of search space (log-uniform ranges) and the same
budget: the default configuration plus ``n`` quasi-random points. The unit-cube points depend
only on the suite seed, not on the optimizer, so optimizers with the same number of searched
hyperparameters are tried at the same relative positions in their ranges (common random
numbers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LogUniform:
    """A hyperparameter searched log-uniformly on ``[low, high]``."""

    low: float
    high: float

    def __post_init__(self):
        if not (0 < self.low <= self.high and math.isfinite(self.high)):
            raise ValueError(f"Invalid log-uniform range: [{self.low}, {self.high}]")

    def at(self, u: float) -> float:
        """The value at unit-interval position ``u`` (4 significant digits)."""
        value = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        return float(f"{value:.4g}")

    def centre(self) -> float:
        """The geometric centre of the range (4 significant digits)."""
        return self.at(0.5)

    def describe(self) -> str:
        return f"log-uniform[{self.low:g}, {self.high:g}]"


def unit_points(n: int, dims: int, seed: int) -> np.ndarray:
    """``n`` scrambled-Halton points in ``[0, 1)^dims``, deterministic given ``seed``."""
    if n == 0 or dims == 0:
        return np.zeros((n, dims))
    from scipy.stats import qmc

    return qmc.Halton(d=dims, scramble=True, seed=seed).random(n)


def sample(space: dict[str, LogUniform], n: int, seed: int) -> list[dict[str, float]]:
    """``n`` configurations from ``space`` (names in sorted order map to cube dimensions)."""
    names = sorted(space)
    points = unit_points(n, len(names), seed)
    return [{k: space[k].at(float(u)) for k, u in zip(names, row)} for row in points]
