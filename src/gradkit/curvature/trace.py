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
exact with zero variance, so tests use non-diagonal matrices (as hessian-eigenthings'
``tests/test_trace.py`` does).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from gradkit._checks import check_positive_int
from gradkit.curvature._operator import LinearOperator
from gradkit.curvature._random import rademacher, randn, resolve_generator


@dataclass
class TraceEstimate:
    """A trace estimate with its standard error and the products it used (``float(est)`` is
    the estimate)."""

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


def _budget(num_matvecs: int | None, old: int | None, old_name: str, fn: str) -> int:
    """``num_matvecs``, or the deprecated keyword ``old_name`` (with a ``FutureWarning``)."""
    if old is not None:
        if num_matvecs is not None:
            raise TypeError(f"{fn}() got both num_matvecs and its deprecated alias {old_name}")
        warnings.warn(f"{fn}({old_name}=...) is deprecated; use num_matvecs=...", FutureWarning,
                      stacklevel=3)
        num_matvecs = old
    if num_matvecs is None:
        raise TypeError(f"{fn}() missing the budget num_matvecs")
    check_positive_int("num_matvecs", num_matvecs)
    return num_matvecs


def hutchinson_trace(
    op: LinearOperator,
    num_matvecs: int | None = None,
    *,
    distribution: Literal["rademacher", "gaussian"] = "rademacher",
    generator: torch.Generator | None = None,
    chunk_size: int | None = 16,
    n_probes: int | None = None,
) -> TraceEstimate:
    """Hutchinson's estimate of ``tr(op)`` from ``num_matvecs`` probes (module docstring).

    Args:
        op: a square :class:`~gradkit.curvature.LinearOperator`.
        num_matvecs: budget of products = number of probes (at least 1; 2 for a standard
            error).
        distribution: "rademacher" (random signs, the lower-variance default) or "gaussian".
        generator: source of the probes (default: a fresh generator seeded from OS entropy;
            the global RNG is never consumed).
        chunk_size: probes multiplied as one block ``op @ Z`` (``None``: all at once).
        n_probes: deprecated alias of ``num_matvecs``.

    Returns:
        A :class:`TraceEstimate` (``estimate``, ``stderr``, ``num_matvecs``, ``samples``).

    Example::

        >>> import torch
        >>> from gradkit.curvature import MatrixOperator, hutchinson_trace
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> est = hutchinson_trace(MatrixOperator(A), 1000,
        ...                        generator=torch.Generator().manual_seed(0))
        >>> abs(est.estimate - 5.0) < 4 * est.stderr
        True
    """
    num_matvecs = _budget(num_matvecs, n_probes, "n_probes", "hutchinson_trace")
    Z = _probes(op.shape[0], num_matvecs, distribution, op, resolve_generator(generator))
    samples = (Z * _apply(op, Z, chunk_size)).sum(dim=0).to(torch.float64)
    return TraceEstimate(float(samples.mean()), _stderr(samples), num_matvecs, samples)


def hutchpp_trace(
    op: LinearOperator,
    num_matvecs: int | None = None,
    *,
    generator: torch.Generator | None = None,
    chunk_size: int | None = 16,
    n_matvecs: int | None = None,
) -> TraceEstimate:
    """Hutch++ estimate of ``tr(op)`` using ``num_matvecs`` products (module docstring).

    The budget is split into a sketch of ``s = (num_matvecs + 2) // 3`` columns (``2 s``
    products) and the remaining ``num_matvecs - 2 s`` (at least 2) Hutchinson probes.

    Args:
        op: a square :class:`~gradkit.curvature.LinearOperator`.
        num_matvecs: budget of products (at least 4).
        generator: source of the probes (default: a fresh generator seeded from OS entropy).
        chunk_size: columns multiplied as one block ``op @ Z`` (``None``: all at once).
        n_matvecs: deprecated alias of ``num_matvecs``.

    Returns:
        A :class:`TraceEstimate`; ``stderr`` is that of the Hutchinson part given the sketch.

    Example::

        >>> import torch
        >>> from gradkit.curvature import MatrixOperator, hutchpp_trace
        >>> A = torch.diag(torch.tensor([100.0, 10.0, 1.0, 0.1], dtype=torch.float64))
        >>> est = hutchpp_trace(MatrixOperator(A), 12, generator=torch.Generator().manual_seed(0))
        >>> round(est.estimate, 6)  # the sketch spans all 4 directions: exact
        111.1
    """
    num_matvecs = _budget(num_matvecs, n_matvecs, "n_matvecs", "hutchpp_trace")
    n = op.shape[0]
    s = (num_matvecs + 2) // 3
    g = num_matvecs - 2 * s
    if s < 1 or g < 2:
        raise ValueError(f"Invalid num_matvecs value: {num_matvecs} (Hutch++ needs at least 4)")
    gen = resolve_generator(generator)
    S = rademacher((n, min(s, n)), op.dtype, op.device, gen)
    Q = torch.linalg.qr(_apply(op, S, chunk_size)).Q
    exact = float(torch.trace(Q.T @ _apply(op, Q, chunk_size)))
    G = rademacher((n, g), op.dtype, op.device, gen)
    G = G - Q @ (Q.T @ G)
    samples = (G * _apply(op, G, chunk_size)).sum(dim=0).to(torch.float64)
    return TraceEstimate(exact + float(samples.mean()), _stderr(samples),
                         2 * S.shape[1] + g, samples)
