r"""Neural collapse metrics NC1–NC4 (Papyan, Han & Donoho, PNAS 2020).

With last-layer features :math:`h_i` (the input of the classifier), class means
:math:`\mu_c`, global mean :math:`\mu_G`, :math:`M = [\mu_c - \mu_G]_c` (p × C) and the
classifier ``W`` (C × p), bias ``b``:

.. math::
    \begin{aligned}
    \Sigma_W &= \operatorname{Avg}_{i}(h_i - \mu_{y_i})(h_i - \mu_{y_i})^\top, \qquad
    \Sigma_B = \operatorname{Avg}_c (\mu_c - \mu_G)(\mu_c - \mu_G)^\top \\
    \mathrm{NC1} &= \operatorname{tr}(\Sigma_W \Sigma_B^\dagger)/C \\
    \mathrm{NC2}_\text{norm} &= \operatorname{Std}_c\lVert\mu_c-\mu_G\rVert /
        \operatorname{Avg}_c\lVert\mu_c-\mu_G\rVert \quad(\text{same for } \lVert w_c\rVert) \\
    \mathrm{NC2}_\text{angle} &= \operatorname{Avg}_{c\ne c'}\lvert\cos(\mu_c,\mu_{c'})
        + \tfrac{1}{C-1}\rvert, \quad \operatorname{Std}_{c\ne c'}\cos(\mu_c, \mu_{c'}) \\
    \mathrm{NC3} &= \lVert W^\top/\lVert W\rVert_F - M/\lVert M\rVert_F\rVert_F^2 \\
    \mathrm{NC4} &= \operatorname{mean}_i\,[\arg\max_c (w_c^\top h_i + b_c)
        \ne \arg\min_c \lVert h_i - \mu_c\rVert]
    \end{aligned}

Choices (documented, tested): ``Σ_B†`` keeps the top ``min(C−1, p)`` eigenpairs of ``Σ_B``
(the rank-(C−1) pseudo-inverse of the widely copied code, which calls ``svds(Sb, k=C-1)``),
with the ``/C`` factor; ``μ_G`` is the mean of the class means (equal to the feature mean for
balanced classes); Std uses the unbiased estimator (torch's default, as in that code); NC4
uses **argmax** of ``Wh + b`` (not the argmin without bias of ``nc-toolbox``'s
``nc4_classifier_agreement``). Classes absent from the sample are dropped.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class NeuralCollapse(NamedTuple):
    nc1: float
    nc2_equinorm_features: float
    nc2_equinorm_weights: float
    nc2_equiangular_features: float
    nc2_angle_std_features: float
    nc2_equiangular_weights: float
    nc2_angle_std_weights: float
    nc3: float
    nc4: float


def _angles(v: Tensor) -> tuple[float, float]:
    """(Avg |cos + 1/(C−1)|, Std cos) over off-diagonal pairs of the rows of ``v``."""
    c = v.shape[0]
    u = v / v.norm(dim=1, keepdim=True)
    cos = u @ u.T
    off = cos[~torch.eye(c, dtype=torch.bool, device=v.device)]
    return float((off + 1.0 / (c - 1)).abs().mean()), float(off.std())


def _cv(norms: Tensor) -> float:
    return float(norms.std() / norms.mean())


def neural_collapse(features: Tensor, labels: Tensor, weight: Tensor,
                    bias: Tensor | None = None) -> NeuralCollapse:
    """NC1–NC4 of last-layer features (Papyan, Han & Donoho, PNAS 2020), in float64.

    With class means μ_c, global mean μ_G, M = [μ_c − μ_G], Σ_W the within-class and Σ_B the
    between-class covariance: ``nc1`` = Tr(Σ_W Σ_B⁺)/C; ``nc2_equinorm_*`` the coefficient of
    variation of ‖μ_c − μ_G‖ (features) or ‖w_c‖ (weights); ``nc2_equiangular_*`` the mean
    |cos + 1/(C−1)| over class pairs and ``nc2_angle_std_*`` the std of those cosines;
    ``nc3`` = ‖Wᵀ/‖W‖_F − M/‖M‖_F‖²_F; ``nc4`` the rate at which argmax_c(w_cᵀh + b_c)
    (the classifier, an *argmax*) disagrees with the nearest class mean. Only classes
    present in ``labels`` count.

    Args:
        features: ``(N, p)`` features entering the classifier.
        labels: ``(N,)`` integer class labels in ``[0, C)``.
        weight: ``(C, p)`` classifier weight.
        bias: ``(C,)`` classifier bias (optional).

    Example::

        >>> import torch
        >>> from gradkit.instruments import neural_collapse
        >>> etf = torch.tensor([[1.0, 0.0], [-0.5, 3**0.5 / 2], [-0.5, -(3**0.5) / 2]])
        >>> labels = torch.tensor([0, 1, 2, 0, 1, 2])
        >>> nc = neural_collapse(etf[labels], labels, etf)  # collapsed features, W = M
        >>> [round(v, 6) for v in (nc.nc1, nc.nc2_equinorm_features, nc.nc3, nc.nc4)]
        [0.0, 0.0, 0.0, 0.0]
    """
    h = features.detach().to(torch.float64).reshape(features.shape[0], -1)
    w = weight.detach().to(torch.float64)
    y = labels.detach().long()
    n_classes = w.shape[0]
    if h.shape[1] != w.shape[1]:
        raise ValueError(f"features have {h.shape[1]} dims but the classifier expects "
                         f"{w.shape[1]}")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes})")
    counts = torch.bincount(y, minlength=n_classes).to(h)
    present = counts > 0
    if int(present.sum()) < 2:
        raise ValueError("neural collapse needs examples of at least 2 classes")
    sums = torch.zeros(n_classes, h.shape[1], dtype=h.dtype, device=h.device)
    sums.index_add_(0, y, h)
    means = sums[present] / counts[present, None]  # (C', p)
    cls = torch.full((n_classes,), -1, dtype=torch.long, device=h.device)
    cls[present] = torch.arange(int(present.sum()), device=h.device)
    w_used = w[present]
    c = means.shape[0]

    centred = means - means.mean(0)  # rows: μ_c − μ_G
    within = h - means[cls[y]]
    sigma_w = within.T @ within / h.shape[0]
    sigma_b = centred.T @ centred / c
    evals, evecs = torch.linalg.eigh(sigma_b)
    r = min(c - 1, h.shape[1])
    top_vals, top_vecs = evals[-r:], evecs[:, -r:]
    pinv = (top_vecs / top_vals) @ top_vecs.T
    nc1 = float(torch.trace(sigma_w @ pinv)) / c

    eq_f, std_f = _angles(centred)
    eq_w, std_w = _angles(w_used)
    m_t = centred.T  # p × C
    nc3 = float(((w_used.T / w_used.norm()) - m_t / m_t.norm()).pow(2).sum())

    logits = h @ w.T + (bias.detach().to(h) if bias is not None else 0.0)
    pred = logits.argmax(dim=1)
    nearest = torch.cdist(h, means).argmin(dim=1)
    present_idx = torch.nonzero(present).squeeze(1)
    nc4 = float((pred != present_idx[nearest]).double().mean())
    return NeuralCollapse(nc1, _cv(centred.norm(dim=1)), _cv(w_used.norm(dim=1)), eq_f, std_f,
                          eq_w, std_w, nc3, nc4)
