"""Statistics of per-example gradients: coherence, gradient noise scale, gradient SNR.

Per-example gradients are a ``(m, d)`` matrix (one flattened gradient per row), the
``{name: (m, *shape)}`` mapping returned by :func:`gradkit.autodiff.per_example_grads`, or
their :class:`GradientMoments`. Every statistic here needs only two moments over the
examples per coordinate, the sum ``Σᵢ gᵢ`` and the centred sum of squares
``Σᵢ (gᵢ − ḡ)²`` (centred, so no digits are lost to the cancellation in
``Σ‖gᵢ‖² − m‖ḡ‖²``), combined in float64. :func:`gradient_moments` is their one owner: the
batch-size tests of :mod:`gradkit.batching.statistics` read the same moments.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

PerExample = Tensor | Mapping[str, Tensor] | Sequence[Tensor]


class GradientMoments(NamedTuple):
    """Moments of m per-example gradients ``g_i`` (float64): the one place they are computed
    for coherence, noise scale, gradient SNR and the batch-size tests of
    :mod:`gradkit.batching`.

    Attributes:
        m: the number of examples.
        sum: ``Σᵢ gᵢ`` per coordinate, shape ``(d,)``.
        centred_sq: ``Σᵢ (gᵢ − ḡ)²`` per coordinate, shape ``(d,)``.
        dots: ``⟨gᵢ − ḡ, ḡ⟩`` per example, shape ``(m,)`` (the inner-product and
            orthogonality tests need it).
    """

    m: int
    sum: Tensor
    centred_sq: Tensor
    dots: Tensor


def _matrices(g: PerExample) -> list[Tensor]:
    if isinstance(g, Tensor):
        if g.ndim != 2:
            raise ValueError(
                f"a per-example gradient matrix must have shape (B, D), got {tuple(g.shape)};"
                " pass a dict {name: (B, ...)} for per-parameter tensors")
        parts = [g]
    else:
        parts = list(g.values()) if isinstance(g, Mapping) else list(g)
    if not parts:
        raise ValueError("no per-example gradients given")
    m = parts[0].shape[0] if parts[0].ndim else 0
    if any(p.ndim == 0 or p.shape[0] != m for p in parts):
        raise ValueError("every per-example gradient tensor needs the same leading batch "
                         f"dimension; got shapes {[tuple(p.shape) for p in parts]}")
    return [p.detach().reshape(m, -1) for p in parts]


def gradient_moments(g: PerExample | GradientMoments, *,
                     dtype: torch.dtype | None = None) -> GradientMoments:
    """:class:`GradientMoments` of per-example gradients (returned as is if already given).

    Computed tensor by tensor (O(m·d) time, O(m·d_t) extra memory for the largest tensor
    ``d_t``). The squares are of centred values, so no digits are lost to the cancellation
    in ``Σ‖gᵢ‖² − m‖ḡ‖²`` even when the reduction runs in float32.

    Args:
        g: a ``(m, d)`` matrix (one flattened gradient per row), the ``{name: (m, *shape)}``
            mapping returned by :func:`gradkit.autodiff.per_example_grads`, or a sequence
            of ``(m, ...)`` tensors.
        dtype: dtype of the reductions over the examples (default: the gradients' own;
            ``torch.float64`` upcasts first, about 8x slower on CPU). The results are
            float64 either way.

    Example::

        >>> import torch
        >>> from gradkit.instruments import gradient_moments
        >>> mom = gradient_moments(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
        >>> mom.m, mom.sum.tolist(), mom.centred_sq.tolist(), mom.dots.tolist()
        (2, [4.0, 0.0], [2.0, 0.0], [-2.0, 2.0])
    """
    if isinstance(g, GradientMoments):
        return g
    mats = _matrices(g)
    m = mats[0].shape[0]
    sums, sqs = [], []
    dots = torch.zeros(m, dtype=torch.float64, device=mats[0].device)
    for flat in mats:
        flat = flat if dtype is None else flat.to(dtype)
        total = flat.sum(0)
        mean = total / m
        centred = flat - mean
        dots += (centred @ mean).double()
        sums.append(total.double())
        sqs.append(centred.mul_(centred).sum(0).double())  # in place: one (m, d) buffer less
    return GradientMoments(m, torch.cat(sums), torch.cat(sqs), dots)


def ratio(num: float, den: float) -> float:
    """``num / den`` with IEEE semantics when ``den == 0``: ``±inf`` for ``num ≠ 0``, NaN
    for ``0/0`` (the one ratio helper of the gradient statistics)."""
    if den != 0:
        return num / den
    return math.copysign(math.inf, num) * math.copysign(1.0, den) if num != 0 else math.nan


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

    Args:
        per_example: per-example gradients (see :func:`gradient_moments`) or their moments.

    Example::

        >>> import torch
        >>> from gradkit.instruments import coherence
        >>> c = coherence(torch.eye(3))  # pairwise orthogonal, equal norms
        >>> round(c.alpha, 6), round(c.m_coherence, 6), c.m
        (0.333333, 1.0, 3)
        >>> coherence(torch.ones(4, 2)).m_coherence  # identical
        4.0
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

    Args:
        per_example: per-example gradients of at least 2 examples (see
            :func:`gradient_moments`) or their moments.

    Example::

        >>> import torch
        >>> from gradkit.instruments import noise_scale_per_example
        >>> noise_scale_per_example(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
        NoiseScale(grad_sq=3.0, trace_cov=2.0, b_simple=0.6666666666666666)
    """
    mom = gradient_moments(per_example)
    b = mom.m
    if b < 2:
        raise ValueError(f"the per-example noise scale needs at least 2 examples, got {b}")
    mean_sq = float(mom.sum @ mom.sum) / b**2
    trace = float(mom.centred_sq.sum()) / (b - 1)
    grad_sq = mean_sq - trace / b
    return NoiseScale(grad_sq, trace, ratio(trace, grad_sq))


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

    As in ``EleutherAI/gpt-neox`` (``gradient_noise_scale.py``, where ``noise`` holds the
    |G|² estimate and ``scale`` the tr Σ one), the big batch may be the average of several
    small ones, and ``small_sq`` may be averaged over those small batches (still unbiased,
    lower variance).

    Args:
        small_sq: squared norm of a mean gradient over ``b_small`` examples.
        big_sq: squared norm of a mean gradient over ``b_big`` examples.
        b_small: the small batch size.
        b_big: the big batch size (``> b_small``).

    Example::

        >>> from gradkit.instruments import noise_scale_two_batch
        >>> # E‖G_B‖² = |G|² + tr Σ / B with |G|² = 2, tr Σ = 8
        >>> noise_scale_two_batch(2 + 8 / 4, 2 + 8 / 16, 4, 16)
        NoiseScale(grad_sq=2.0, trace_cov=8.0, b_simple=4.0)
    """
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1 / b_small - 1 / b_big)
    return NoiseScale(grad_sq, trace, ratio(trace, grad_sq))


class NoiseScaleEMA:
    """Exponential moving averages of ``|G|²`` and ``tr Σ`` kept *separately*; the smoothed
    noise scale is the ratio of the two averages (gpt-neox's scheme, with the usual
    ``1 − β^t`` bias correction so early values are not shrunk toward 0). Non-finite
    estimates are skipped.

    Args:
        beta: the EMA factor in [0, 1) (default 0.99).

    Example::

        >>> from gradkit.instruments import NoiseScaleEMA, noise_scale_two_batch
        >>> ema = NoiseScaleEMA(beta=0.5)
        >>> _ = ema.update(noise_scale_two_batch(4.0, 2.5, 4, 16))
        >>> round(ema.update(noise_scale_two_batch(3.0, 2.0, 4, 16)).b_simple, 6)
        3.5
    """

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
        return NoiseScale(g, t, ratio(t, g))


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

    Args:
        per_example: per-example gradients of at least 2 examples (see
            :func:`gradient_moments`) or their moments.

    Example::

        >>> import torch
        >>> from gradkit.instruments import gradient_snr
        >>> gradient_snr(torch.tensor([[1.0, 5.0], [3.0, 5.0]]))  # coordinate 0: 2² / 2
        2.0
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
