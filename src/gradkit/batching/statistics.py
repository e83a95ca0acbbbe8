r"""AdAdaGrad's batch-size tests, computed from per-example gradients.

Given per-example gradients :math:`g_1, \dots, g_b` at the current iterate, the mini-batch
gradient :math:`\bar g = \frac1b \sum_i g_i` and the unbiased variance
:math:`\operatorname{Var}_i` (divisor :math:`b-1`), each test returns the batch size it would
need, :math:`r`, and the next batch size :math:`b_{k+1} = \min(b_{\max}, \max(b_k, \lceil r
\rceil))` (never decreasing, capped):

.. math::
    \begin{aligned}
    &\textbf{norm (Byrd et al. 2012):}\quad
        r = \frac{\sum_j \operatorname{Var}_i(g_{ij})}{\eta^2 \lVert \bar g\rVert^2} \\
    &\textbf{inner product (Bollapragada et al. 2018):}\quad
        r = \frac{\operatorname{Var}_i(\langle g_i, \bar g\rangle)}
                 {\theta^2 \lVert \bar g\rVert^4} \\
    &\textbf{orthogonality:}\quad
        g_i^\perp = g_i - \frac{\langle g_i, \bar g\rangle}{\lVert \bar g\rVert^2}\bar g,
        \qquad r = \frac{\sum_j \operatorname{Var}_i(g^\perp_{ij})}
                        {\nu^2 \lVert \bar g\rVert^2} \\
    &\textbf{augmented inner product:}\quad r = \max(r_{\text{inner}}, r_{\text{ortho}}) \\
    &\textbf{coordinate-wise (UNVERIFIED form):}\quad
        r = \max_j \frac{\operatorname{Var}_i(g_{ij})}{\eta^2 \bar g_j^2}
    \end{aligned}

A test *passes* at batch size :math:`b` when :math:`r \le b` (e.g. the norm test's
:math:`\sum_j \operatorname{Var}_i(g_{ij}) / b \le \eta^2 \lVert \bar g\rVert^2`).

Paper: Lau, Liu & Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient
Methods" (arXiv 2402.11215). Reference code matched: ``timlautk/AdAdaGrad`` (``tests.py``,
``main.py``, HEAD cc126fb): variances and
squared norms are summed over all parameter tensors before dividing; the result is clipped
to ``max_batch_size``; the batch size never decreases. Defaults η = θ = ν = 0.1.

Choices made here (documented and tested):

* **Coordinate-wise test.** Not in the released code; we use the reading
  :math:`\max_j \operatorname{Var}_i(g_{ij}) / (\eta^2 (\bar g_j^2 + \epsilon))` with
  ``eps = 0`` by default. Coordinates with zero variance are skipped (ratio 0, so unused or
  dead parameters with :math:`\bar g_j = 0` and no noise never trigger the test); a
  coordinate with :math:`\bar g_j = 0` but positive variance gives :math:`r = \infty`, i.e.
  the cap ``max_batch_size``. ``eps > 0`` softens that.
* **Zero mean gradient.** :math:`\lVert\bar g\rVert = 0` with positive variance gives
  :math:`r = \infty` (the cap) for the norm, inner-product, orthogonality and augmented
  tests (the inner-product variance is then 0/0: the mean is pure noise, so we take ∞);
  with all gradients zero, :math:`r = 0` (nothing to average).
  With no cap an infinite :math:`r` raises ``ValueError``.
* **Orthogonality when** :math:`\bar g = 0`: the projection coefficient is taken as 0 (as
  ⊥Grad's guard does), so :math:`g^\perp = g`.
* All sums are accumulated in float64, one parameter tensor at a time (O(b·D_t) temporary
  memory for the largest tensor), fully vectorised; results are Python floats. The moments
  come from :func:`gradkit.instruments.gradient_moments`, which the Monitor's coherence,
  noise-scale and SNR instruments read too (it passes its own float32-reduced moments).

:func:`gradient_statistics` exposes the η-free sufficient statistics (for instruments such
as Cockpit-style NormTest / InnerTest / OrthoTest), and :meth:`GradientStatistics.norm_test_value`
etc. give the smallest threshold that passes at the current batch size, which is what
Cockpit reports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from gradkit._checks import check_positive, check_positive_int
from gradkit.instruments.gradients import GradientMoments, gradient_moments, ratio

PerExampleGrads = Mapping[str, Tensor] | Tensor | Sequence[Tensor]
TestName = Literal["norm", "inner_product", "orthogonality", "augmented", "coordinate"]
TESTS: tuple[str, ...] = ("norm", "inner_product", "orthogonality", "augmented", "coordinate")


@dataclass(frozen=True)
class GradientStatistics:
    """Threshold-free statistics of a set of per-example gradients (all float64 scalars).

    Attributes:
        num_examples: b, the number of per-example gradients.
        mean_sq_norm: :math:`\\lVert \\bar g\\rVert^2`.
        variance_trace: :math:`\\sum_j \\operatorname{Var}_i(g_{ij})` (unbiased).
        inner_product_variance: :math:`\\operatorname{Var}_i(\\langle g_i, \\bar g\\rangle)`.
        orthogonal_variance: :math:`\\sum_j \\operatorname{Var}_i(g^\\perp_{ij})`.
        max_coordinate_ratio: :math:`\\max_j \\operatorname{Var}_i(g_{ij}) /
            (\\bar g_j^2 + \\epsilon)` over coordinates with positive variance (0 if none).
    """

    num_examples: int
    mean_sq_norm: float
    variance_trace: float
    inner_product_variance: float
    orthogonal_variance: float
    max_coordinate_ratio: float

    def _threshold(self, numerator: float, denominator: float, batch_size: int | None) -> float:
        b = self.num_examples if batch_size is None else batch_size
        return math.sqrt(_requirement(self, numerator, denominator) / b)

    def norm_test_value(self, batch_size: int | None = None) -> float:
        """Smallest η for which the norm test passes at ``batch_size`` (default b)."""
        return self._threshold(self.variance_trace, self.mean_sq_norm, batch_size)

    def inner_product_test_value(self, batch_size: int | None = None) -> float:
        """Smallest θ for which the inner-product test passes at ``batch_size``."""
        return self._threshold(self.inner_product_variance, self.mean_sq_norm**2, batch_size)

    def orthogonality_test_value(self, batch_size: int | None = None) -> float:
        """Smallest ν for which the orthogonality test passes at ``batch_size``."""
        return self._threshold(self.orthogonal_variance, self.mean_sq_norm, batch_size)


@dataclass(frozen=True)
class BatchSizeDecision:
    """Outcome of one batch-size test.

    Attributes:
        test: which test ran.
        statistic: r, the batch size the test asks for (a float, may be ``inf``).
        batch_size: the current batch size b_k the test was judged against.
        passed: ``statistic <= batch_size``.
        next_batch_size: ``min(max_batch_size, max(batch_size, ceil(statistic)))``.
    """

    test: str
    statistic: float
    batch_size: int
    passed: bool
    next_batch_size: int


def gradient_statistics(grads: PerExampleGrads | GradientMoments, *,
                        eps: float = 0.0) -> GradientStatistics:
    """Sufficient statistics of per-example gradients for every batch-size test, read from
    their :class:`~gradkit.instruments.GradientMoments` (the moments that coherence, the
    noise scale and the gradient SNR read too).

    Args:
        grads: ``{name: (B, *shape)}`` as returned by
            :func:`gradkit.autodiff.per_example_grads`, a ``(B, D)`` matrix, a sequence
            of ``(B, ...)`` tensors, or their precomputed moments. Moments are computed
            here with float64 reductions.
        eps: added to :math:`\\bar g_j^2` in the coordinate-wise ratio (default 0).

    Example::

        >>> import torch
        >>> from gradkit.batching import gradient_statistics
        >>> s = gradient_statistics(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
        >>> s.mean_sq_norm, s.variance_trace, s.inner_product_variance, s.orthogonal_variance
        (4.0, 2.0, 8.0, 0.0)
    """
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"Invalid eps value: {eps}")
    mom = gradient_moments(grads, dtype=torch.float64)
    b = mom.m
    if b < 2:
        raise ValueError(f"the batch-size tests need at least 2 per-example gradients, got {b}")
    mean = mom.sum / b
    var = mom.centred_sq / (b - 1)  # per coordinate, unbiased
    mean_sq = float(mean @ mean)
    var_sum = float(var.sum())
    noisy = var > 0
    max_ratio = float((var[noisy] / (mean[noisy].square() + eps)).max()) if bool(
        noisy.any()) else 0.0
    # <g_i, ḡ> = <g_i − ḡ, ḡ> + ||ḡ||²: the constant shift does not change the variance
    ip_var = float(mom.dots.var(correction=1))
    # g⊥_i = g_i − c_i ḡ with c_i = <g_i, ḡ>/||ḡ||² (mean 1), so g⊥_i − mean = d_i − a_i ḡ
    # with d_i = g_i − ḡ, a_i = <d_i, ḡ>/||ḡ||², and Σ_i ||d_i − a_i ḡ||² equals
    # Σ_i ||d_i||² − Σ_i <d_i, ḡ>²/||ḡ||²  (clamped at 0 against rounding)
    if mean_sq > 0:
        ortho = float(mom.centred_sq.sum()) - float(mom.dots @ mom.dots) / mean_sq
        ortho_var = max(ortho, 0.0) / (b - 1)
    else:
        ortho_var = var_sum
    return GradientStatistics(b, mean_sq, var_sum, ip_var, ortho_var, max_ratio)


def _requirement(stats: GradientStatistics, numerator: float, denominator: float) -> float:
    """numerator / denominator, except that a zero mean gradient asks for an infinite batch
    when the gradients are noisy at all, and no noise asks for none."""
    if stats.mean_sq_norm == 0:
        return math.inf if stats.variance_trace > 0 else 0.0
    return 0.0 if numerator <= 0 else ratio(numerator, denominator)


def _decide(test: str, r: float, batch_size: int, max_batch_size: int | None) -> BatchSizeDecision:
    if math.isinf(r) and max_batch_size is None:
        raise ValueError(
            f"the {test} test asks for an infinite batch size (the mean gradient is zero, or a "
            "coordinate with zero mean has noise); pass max_batch_size to cap it"
        )
    need = math.inf if math.isinf(r) else math.ceil(r)
    nxt = max(batch_size, need)
    if max_batch_size is not None:
        nxt = max(batch_size, min(nxt, max_batch_size))
    return BatchSizeDecision(test, r, batch_size, r <= batch_size, int(nxt))


def _stats_and_b(grads, batch_size, max_batch_size, eps=0.0):
    stats = grads if isinstance(grads, GradientStatistics) else gradient_statistics(grads, eps=eps)
    b = stats.num_examples if batch_size is None else batch_size
    check_positive_int("batch_size", b)
    if max_batch_size is not None:
        check_positive_int("max_batch_size", max_batch_size)
    return stats, b


_DOC_ARGS = """
    Args:
        grads: per-example gradients (``{name: (B, ...)}``, a ``(B, D)`` matrix or a
            sequence of tensors) or precomputed :class:`GradientStatistics`.
        batch_size: the current batch size b_k (default: the number of examples). The
            next batch size is never below it.
        max_batch_size: cap on the next batch size (default: none).
"""


def norm_test(grads: PerExampleGrads | GradientStatistics, eta: float = 0.1, *,
              batch_size: int | None = None,
              max_batch_size: int | None = None) -> BatchSizeDecision:
    check_positive("eta", eta)
    stats, b = _stats_and_b(grads, batch_size, max_batch_size)
    r = _requirement(stats, stats.variance_trace, eta**2 * stats.mean_sq_norm)
    return _decide("norm", r, b, max_batch_size)


def inner_product_test(grads: PerExampleGrads | GradientStatistics, theta: float = 0.1, *,
                       batch_size: int | None = None,
                       max_batch_size: int | None = None) -> BatchSizeDecision:
    check_positive("theta", theta)
    stats, b = _stats_and_b(grads, batch_size, max_batch_size)
    r = _requirement(stats, stats.inner_product_variance, theta**2 * stats.mean_sq_norm**2)
    return _decide("inner_product", r, b, max_batch_size)


def orthogonality_test(grads: PerExampleGrads | GradientStatistics, nu: float = 0.1, *,
                       batch_size: int | None = None,
                       max_batch_size: int | None = None) -> BatchSizeDecision:
    check_positive("nu", nu)
    stats, b = _stats_and_b(grads, batch_size, max_batch_size)
    r = _requirement(stats, stats.orthogonal_variance, nu**2 * stats.mean_sq_norm)
    return _decide("orthogonality", r, b, max_batch_size)


def augmented_inner_product_test(grads: PerExampleGrads | GradientStatistics,
                                 theta: float = 0.1, nu: float = 0.1, *,
                                 batch_size: int | None = None,
                                 max_batch_size: int | None = None) -> BatchSizeDecision:
    check_positive("theta", theta)
    check_positive("nu", nu)
    stats, b = _stats_and_b(grads, batch_size, max_batch_size)
    inner = stats.inner_product_variance / theta**2, stats.mean_sq_norm**2
    ortho = stats.orthogonal_variance / nu**2, stats.mean_sq_norm
    r = max(_requirement(stats, *inner), _requirement(stats, *ortho))
    return _decide("augmented", r, b, max_batch_size)


def coordinate_test(grads: PerExampleGrads | GradientStatistics, eta: float = 0.1, *,
                    batch_size: int | None = None, max_batch_size: int | None = None,
                    eps: float = 0.0) -> BatchSizeDecision:
    check_positive("eta", eta)
    if isinstance(grads, GradientStatistics) and eps != 0.0:
        raise ValueError("eps is applied when the statistics are computed: pass "
                         "gradient_statistics(grads, eps=...) instead")
    stats, b = _stats_and_b(grads, batch_size, max_batch_size, eps)
    r = stats.max_coordinate_ratio / eta**2
    return _decide("coordinate", r, b, max_batch_size)


norm_test.__doc__ = "Norm test (Byrd et al. 2012): r = ΣVar / (η² ||ḡ||²)." + _DOC_ARGS
inner_product_test.__doc__ = (
    "Inner-product test (Bollapragada et al. 2018): r = Var<g_i, ḡ> / (θ² ||ḡ||⁴)." + _DOC_ARGS)
orthogonality_test.__doc__ = "Orthogonality test: r = ΣVar(g⊥) / (ν² ||ḡ||²)." + _DOC_ARGS
augmented_inner_product_test.__doc__ = (
    "Augmented inner-product test: the max of the inner-product and orthogonality "
    "requirements." + _DOC_ARGS)
coordinate_test.__doc__ = (
    "Coordinate-wise norm test (UNVERIFIED form, see the module docstring): "
    "r = max_j Var_j / (η² (ḡ_j² + eps))." + _DOC_ARGS
    + "        eps: added to ḡ_j² (default 0: a noisy coordinate with zero mean asks for the "
    "cap).\n")


def run_test(test: str, grads: PerExampleGrads | GradientStatistics, *, eta: float = 0.1,
             theta: float = 0.1, nu: float = 0.1, batch_size: int | None = None,
             max_batch_size: int | None = None) -> BatchSizeDecision:
    """Dispatch on the test name (``"norm"``, ``"inner_product"``, ``"orthogonality"``,
    ``"augmented"``, ``"coordinate"``) with the matching threshold(s)."""
    kw = {"batch_size": batch_size, "max_batch_size": max_batch_size}
    if test == "norm":
        return norm_test(grads, eta, **kw)
    if test == "inner_product":
        return inner_product_test(grads, theta, **kw)
    if test == "orthogonality":
        return orthogonality_test(grads, nu, **kw)
    if test == "augmented":
        return augmented_inner_product_test(grads, theta, nu, **kw)
    if test == "coordinate":
        return coordinate_test(grads, eta, **kw)
    raise ValueError(f"Invalid test: {test!r} (use one of {', '.join(TESTS)})")
