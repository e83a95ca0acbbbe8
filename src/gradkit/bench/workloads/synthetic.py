"""Synthetic workloads with known structure: the noisy quadratic model and Rosenbrock."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class _Point(nn.Module):
    """A model that is just a parameter vector (optimisation test functions)."""

    def __init__(self, init: Tensor):
        super().__init__()
        self.x = nn.Parameter(init)


class NoisyQuadratic:
    r"""Noisy quadratic model (NQM, Zhang et al. 2019) with a power-law spectrum.

    .. math::
        \ell(x; c) = \tfrac12 \sum_i h_i (x_i - c_i)^2,\quad h_i = i^{-\alpha},\quad
        c \sim \mathcal N\!\big(0, \sigma^2 H^{-1} / B\big)

    so the minibatch gradient is :math:`Hx + \xi` with noise covariance
    :math:`\sigma^2 H / B` (gradient noise proportional to curvature, as in the NQM paper).
    The evaluation metric is the exact excess risk :math:`\tfrac12 x^\top H x` (population
    risk minus its minimum), so validation and test coincide by construction. The start point
    is :math:`x_0 \sim \mathcal N(0, I)` drawn from the trial seed.
    """

    metric = "excess risk"
    higher_is_better = False

    def __init__(self, dim: int = 100, alpha: float = 1.0, noise: float = 1.0,
                 steps: int = 200, batch_size: int = 32, eval_every: int = 10,
                 target: float = 0.1, name: str = "quadratic"):
        self.dim, self.alpha, self.noise = dim, alpha, noise
        self.steps, self.batch_size, self.eval_every, self.target = (
            steps, batch_size, eval_every, target)
        self.name = name
        self.description = (f"noisy quadratic, d={dim}, spectrum h_i=i^-{alpha:g}, "
                            f"gradient noise covariance {noise:g}²·H/B")

    def setup(self, seed: int) -> _QuadraticProblem:
        return _QuadraticProblem(self, seed)


class _QuadraticProblem:
    def __init__(self, spec: NoisyQuadratic, seed: int):
        self.seed, self.spec = seed, spec
        self.h = torch.arange(1, spec.dim + 1, dtype=torch.float32).pow(-spec.alpha)
        self.noise_std = spec.noise / (spec.batch_size * self.h).sqrt()
        init = torch.randn(spec.dim, generator=torch.Generator().manual_seed(seed))
        self.model = _Point(init)

    def train_loss(self, step: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        c = torch.randn(self.spec.dim, generator=g).to(self.h.device) * self.noise_std
        return 0.5 * (self.h * (self.model.x - c).square()).sum()

    def to(self, device: torch.device) -> _QuadraticProblem:
        """Move to ``device`` (``gradkit bench --device``); the noise is drawn on the CPU."""
        self.model.to(device)
        self.h, self.noise_std = self.h.to(device), self.noise_std.to(device)
        return self

    def evaluate(self, split: str) -> tuple[float, float]:
        risk = float(0.5 * (self.h * self.model.x.detach().square()).sum())
        return risk, risk


class Rosenbrock:
    r"""High-dimensional (extended) Rosenbrock function.

    .. math:: f(x) = \sum_{i=1}^{d-1} 100\,(x_{i+1} - x_i^2)^2 + (1 - x_i)^2,\qquad f^\star = 0

    Deterministic (no data): the batch size is nominal, validation and test are both
    :math:`f(x)`. Start: the classic point :math:`(-1.2, 1, -1.2, 1, \dots)` plus a
    :math:`0.1\cdot\mathcal N(0, I)` perturbation drawn from the trial seed.
    """

    metric = "f(x)"
    higher_is_better = False
    batch_size = 1

    def __init__(self, dim: int = 10, steps: int = 400, eval_every: int = 10,
                 target: float = 1.0, name: str = "rosenbrock"):
        self.dim, self.steps, self.eval_every, self.target = dim, steps, eval_every, target
        self.name = name
        self.description = f"extended Rosenbrock, d={dim}"

    def setup(self, seed: int) -> _RosenbrockProblem:
        return _RosenbrockProblem(self.dim, seed)


class _RosenbrockProblem:
    def __init__(self, dim: int, seed: int):
        start = torch.tensor([-1.2, 1.0]).repeat(math.ceil(dim / 2))[:dim]
        noise = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
        self.model = _Point(start + 0.1 * noise)

    def to(self, device: torch.device) -> _RosenbrockProblem:
        """Move to ``device`` (``gradkit bench --device``)."""
        self.model.to(device)
        return self

    def _value(self) -> Tensor:
        x = self.model.x
        return (100.0 * (x[1:] - x[:-1].square()).square() + (1.0 - x[:-1]).square()).sum()

    def train_loss(self, step: int) -> Tensor:
        return self._value()

    def evaluate(self, split: str) -> tuple[float, float]:
        value = float(self._value().detach())
        return value, value
