r"""Stochastic trace estimation: Hutchinson and Hutch++.

Hutchinson (1989): with probes :math:`z_j` of zero mean and identity covariance,

.. math::
    \widehat{\operatorname{tr}}(A) = \frac1m \sum_{j=1}^m z_j^\top A z_j, \qquad
    \operatorname{se} = \frac{\operatorname{std}_j(z_j^\top A z_j)}{\sqrt m}.

Hutch++ (Meyer, Musco, Musco & Woodruff, "Hutch++: Optimal Stochastic Trace Estimation",
SOSA 2021, Algorithm 1) with ``m`` products: ``m/3`` sketch products :math:`AS`,
:math:`Q = \operatorname{qr}(AS)`, ``m/3`` products :math:`AQ` and ``m/3`` Hutchinson probes
:math:`G` on the deflated matrix:

.. math::
    \widehat{\operatorname{tr}}(A) = \operatorname{tr}(Q^\top A Q)
        + \frac{1}{m/3} \operatorname{tr}\big(G^\top (I - QQ^\top) A (I - QQ^\top) G\big).

Its ``stderr`` is that of the second (random) term given ``Q``; the estimate is unbiased
for any ``Q``. Rademacher probes everywhere. On a diagonal matrix Rademacher Hutchinson is
exact with zero variance, so tests use non-diagonal matrices (HE ``tests/test_trace.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from gradkit.curvature._operator import LinearOperator
from gradkit.curvature._random import rademacher, randn, resolve_generator


@dataclass
class TraceEstimate:
    """A trace estimate with its standard error and the products it used."""

    estimate: float
    stderr: float
    num_matvecs: int
    samples: Tensor = field(repr=False)  # per-probe quadratic forms of the random part

    def __float__(self) -> float:
        return self.estimate


def _probes(n: int, m: int, distribution: str, op: LinearOperator,
            gen: torch.Generator) -> Tensor:
    if distribution == "rademacher":
        return rademacher((n, m), op.dtype, op.device, gen)
    if distribution in ("gaussian", "normal"):
        return randn((n, m), op.dtype, op.device, gen)
    raise ValueError(f"Invalid distribution: {distribution!r} (use 'rademacher' or 'gaussian')")


def _apply(op: LinearOperator, Z: Tensor, chunk_size: int | None) -> Tensor:
    if chunk_size is None or Z.shape[1] <= chunk_size:
        return op.matmat(Z)
    return torch.cat([op.matmat(Z[:, i:i + chunk_size])
                      for i in range(0, Z.shape[1], chunk_size)], dim=1)


def _stderr(samples: Tensor) -> float:
    if samples.numel() < 2:
        return float("inf")
    return float(samples.std(unbiased=True)) / samples.numel() ** 0.5


def hutchinson_trace(
    op: LinearOperator,
    n_probes: int,
    *,
    distribution: Literal["rademacher", "gaussian"] = "rademacher",
    generator: torch.Generator | None = None,
    chunk_size: int | None = 16,
) -> TraceEstimate:
    """Hutchinson's estimate of ``tr(op)`` from ``n_probes`` products (module docstring).

    ``chunk_size`` probes are multiplied as one block (vectorised over the columns).
    """
    if n_probes < 1:
        raise ValueError(f"Invalid n_probes: {n_probes}")
    Z = _probes(op.shape[0], n_probes, distribution, op, resolve_generator(generator))
    samples = (Z * _apply(op, Z, chunk_size)).sum(dim=0).to(torch.float64)
    return TraceEstimate(float(samples.mean()), _stderr(samples), n_probes, samples)


def hutchpp_trace(
    op: LinearOperator,
    n_matvecs: int,
    *,
    generator: torch.Generator | None = None,
    chunk_size: int | None = 16,
) -> TraceEstimate:
    """Hutch++ estimate of ``tr(op)`` using ``n_matvecs`` products (module docstring).

    The budget is split into a sketch of ``s = (n_matvecs + 2) // 3`` columns (``2 s``
    products) and the remaining ``n_matvecs - 2 s`` (at least 2) Hutchinson probes.
    """
    n = op.shape[0]
    s = (n_matvecs + 2) // 3
    g = n_matvecs - 2 * s
    if s < 1 or g < 2:
        raise ValueError(f"Invalid n_matvecs: {n_matvecs} (Hutch++ needs at least 4)")
    gen = resolve_generator(generator)
    S = rademacher((n, min(s, n)), op.dtype, op.device, gen)
    Q = torch.linalg.qr(_apply(op, S, chunk_size)).Q
    exact = float(torch.trace(Q.T @ _apply(op, Q, chunk_size)))
    G = rademacher((n, g), op.dtype, op.device, gen)
    G = G - Q @ (Q.T @ G)
    samples = (G * _apply(op, G, chunk_size)).sum(dim=0).to(torch.float64)
    return TraceEstimate(exact + float(samples.mean()), _stderr(samples),
                         2 * S.shape[1] + g, samples)
