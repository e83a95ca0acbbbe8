"""Statistics of per-example gradients: coherence, gradient noise scale, gradient SNR.

Per-example gradients are a ``(m, d)`` matrix (one flattened gradient per row), the
``{name: (m, *shape)}`` mapping returned by :func:`gradkit.autodiff.per_example_grads`, or
their :class:`GradientMoments`. Every statistic needs only two moments over the examples
per coordinate, the sum ``Σᵢ gᵢ`` and the centred sum of squares ``Σᵢ (gᵢ − ḡ)²`` (centred,
so no digits are lost to the cancellation in ``Σ‖gᵢ‖² − m‖ḡ‖²``), computed tensor by tensor
(O(m·d) time, O(d) extra memory) and combined in float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

PerExample = Tensor | Mapping[str, Tensor]


class GradientMoments(NamedTuple):
    """Moments of m per-example gradients, per coordinate (float64)."""

    m: int
    sum: Tensor  #: Σᵢ gᵢ, shape (d,)
    centred_sq: Tensor  #: Σᵢ (gᵢ − ḡ)², shape (d,)


def gradient_moments(g: PerExample | GradientMoments) -> GradientMoments:
    """:class:`GradientMoments` of per-example gradients (returned as is if already given)."""
    if isinstance(g, GradientMoments):
        return g
    parts = list(g.values()) if isinstance(g, Mapping) else [g]
    if not parts:
        raise ValueError("no per-example gradients given")
    sums, sqs = [], []
    for p in parts:
        flat = p.detach().reshape(p.shape[0], -1)
        total = flat.sum(0)
        centred = flat - total / flat.shape[0]
        sums.append(total.double())  # (a float64 reduction over dim 0 is ~8x slower)
        sqs.append(centred.mul_(centred).sum(0).double())  # in place: one (m, d) buffer less
    return GradientMoments(parts[0].shape[0], torch.cat(sums), torch.cat(sqs))


class Coherence(NamedTuple):
    alpha: float  #: ‖ḡ‖² / mean_i ‖gᵢ‖²  ∈ [0, 1]
    m_coherence: float  #: m·α = ‖Σ gᵢ‖² / Σ ‖gᵢ‖²  ∈ [0, m]
    m: int


def coherence(per_example: PerExample | GradientMoments) -> Coherence:
    r"""Gradient coherence α and m-coherence of a sample of m per-example gradients.

    .. math::
        \begin{aligned}
        \alpha &= \frac{\lVert \tfrac1m \sum_i g_i \rVert^2}{\tfrac1m \sum_i \lVert g_i\rVert^2}
               = \frac{\mathbb E_{i,j}\langle g_i, g_j\rangle}{\mathbb E_i \lVert g_i\rVert^2},
        \qquad \alpha_\perp = \tfrac1m, \\
        \alpha_m &= \alpha/\alpha_\perp = m\,\alpha
               = \frac{\lVert \sum_i g_i\rVert^2}{\sum_i \lVert g_i\rVert^2}
        \end{aligned}

    Chatterjee & Zielinski, "On the Generalization Mystery in Deep Learning" (arXiv
    2203.10036) and Zielinski & Chatterjee, "Making Coherence Out of Nothing At All" (arXiv
    2008.01217). Squared norms (not the ``‖E g‖/E‖g‖`` form some write-ups use). O(m)
    accumulation of ``Σ gᵢ`` and ``Σ ‖gᵢ‖²``. ``α_m`` is 1 for pairwise-orthogonal equal-norm
    gradients, m for identical ones and 0 when they cancel. All-zero gradients give NaN.
    """
    mom = gradient_moments(per_example)
    m, sum_sq = mom.m, float(mom.sum @ mom.sum)
    sq_sum = float(mom.centred_sq.sum()) + sum_sq / m  # Σ‖gᵢ‖² = Σ‖gᵢ − ḡ‖² + m‖ḡ‖²
    if sq_sum == 0:
        return Coherence(float("nan"), float("nan"), m)
    am = sum_sq / sq_sum
    return Coherence(am / m, am, m)


class NoiseScale(NamedTuple):
    grad_sq: float  #: unbiased estimate of |G|²
    trace_cov: float  #: unbiased estimate of tr Σ (per-example covariance)
    b_simple: float  #: trace_cov / grad_sq


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else float("nan")


def noise_scale_per_example(per_example: PerExample | GradientMoments) -> NoiseScale:
    r"""Simple gradient noise scale from the per-example gradients of one batch of size B.

    .. math::
        \begin{aligned}
        \operatorname{tr}\hat\Sigma &= \tfrac{1}{B-1}\sum_i \lVert g_i - \bar g\rVert^2
            = \tfrac{1}{B-1}\big(\textstyle\sum_i \lVert g_i\rVert^2 - B\lVert\bar g\rVert^2\big),\\
        \widehat{|G|^2} &= \lVert\bar g\rVert^2 - \operatorname{tr}\hat\Sigma / B, \qquad
        B_\text{simple} = \operatorname{tr}\hat\Sigma / \widehat{|G|^2}
        \end{aligned}

    McCandlish et al., "An Empirical Model of Large-Batch Training" (arXiv 1812.06162); both
    estimates are unbiased, their ratio only consistent (it can be negative or huge when
    ``|G|²`` is small against the noise: smooth numerator and denominator separately with
    :class:`NoiseScaleEMA` before dividing).
    """
    mom = gradient_moments(per_example)
    b = mom.m
    if b < 2:
        raise ValueError(f"the per-example noise scale needs at least 2 examples, got {b}")
    mean_sq = float(mom.sum @ mom.sum) / b**2
    trace = float(mom.centred_sq.sum()) / (b - 1)
    grad_sq = mean_sq - trace / b
    return NoiseScale(grad_sq, trace, _ratio(trace, grad_sq))


def noise_scale_two_batch(small_sq: float, big_sq: float, b_small: float, b_big: float
                          ) -> NoiseScale:
    r"""Two-batch unbiased estimators of McCandlish et al., Appendix A.

    .. math::
        \begin{aligned}
        \widehat{|G|^2} &= \frac{B_\text{big}\lVert G_\text{big}\rVert^2
            - B_\text{small}\lVert G_\text{small}\rVert^2}{B_\text{big} - B_\text{small}}, \qquad
        \widehat{\operatorname{tr}\Sigma} = \frac{\lVert G_\text{small}\rVert^2
            - \lVert G_\text{big}\rVert^2}{1/B_\text{small} - 1/B_\text{big}}
        \end{aligned}

    ``small_sq``/``big_sq`` are squared norms of mean gradients over ``b_small``/``b_big``
    examples; as in ``EleutherAI/gpt-neox`` (``gradient_noise_scale.py``, where ``noise``
    holds the |G|² estimate and ``scale`` the tr Σ one), the big batch may be the average of
    several small ones, and ``small_sq`` may be averaged over those small batches (still
    unbiased, lower variance).
    """
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1 / b_small - 1 / b_big)
    return NoiseScale(grad_sq, trace, _ratio(trace, grad_sq))


class NoiseScaleEMA:
    """Exponential moving averages of ``|G|²`` and ``tr Σ`` kept *separately*; the smoothed
    noise scale is the ratio of the two averages (gpt-neox's scheme, default β = 0.99, with
    the usual ``1 − β^t`` bias correction so early values are not shrunk toward 0)."""

    def __init__(self, beta: float = 0.99):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta: {beta}")
        self.beta = beta
        self.count = 0
        self._grad_sq = 0.0
        self._trace = 0.0

    def update(self, estimate: NoiseScale) -> NoiseScale:
        """Fold one raw estimate in and return the smoothed ``(|G|², tr Σ, ratio)``."""
        if not (math.isfinite(estimate.grad_sq) and math.isfinite(estimate.trace_cov)):
            return self.value()
        self.count += 1
        b = self.beta
        self._grad_sq = b * self._grad_sq + (1 - b) * estimate.grad_sq
        self._trace = b * self._trace + (1 - b) * estimate.trace_cov
        return self.value()

    def value(self) -> NoiseScale:
        if self.count == 0:
            return NoiseScale(float("nan"), float("nan"), float("nan"))
        corr = 1 - self.beta**self.count
        g, t = self._grad_sq / corr, self._trace / corr
        return NoiseScale(g, t, _ratio(t, g))


def gradient_snr(per_example: PerExample | GradientMoments) -> float:
    r"""Mean gradient signal-to-noise ratio over parameters (GSNR).

    .. math::
        r_j = \frac{\bar g_j^{\,2}}{\hat\sigma_j^2}, \qquad
        \hat\sigma_j^2 = \tfrac{1}{m-1}\sum_i (g_{ij} - \bar g_j)^2, \qquad
        \mathrm{SNR} = \operatorname{mean}_{j:\,\hat\sigma_j>0} r_j

    The per-parameter GSNR of Liu et al., "Understanding Why Neural Networks Generalize Well
    Through GSNR of Parameters" (ICLR 2020), averaged over the coordinates with non-zero
    variance (zero-variance coordinates, e.g. dead units, are excluded). Our choice of
    averaging; the per-example gradients are those of the individual losses.
    """
    mom = gradient_moments(per_example)
    m = mom.m
    if m < 2:
        raise ValueError("the gradient SNR needs at least 2 examples")
    mean = mom.sum / m
    var = mom.centred_sq / (m - 1)
    keep = var > 0
    count = int(keep.sum())
    if count == 0:
        return float("nan")
    ratio = torch.where(keep, mean * mean / torch.where(keep, var, 1.0), 0.0)
    return float(ratio.sum()) / count
