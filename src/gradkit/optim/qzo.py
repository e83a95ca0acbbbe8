"""QZO (Shang et al., 2025): zeroth-order fine-tuning of a quantized model by training only
the quantization scales, with MeZO's estimate clipped (directional-derivative clipping)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from gradkit._checks import check_positive
from gradkit.optim._registry import register
from gradkit.optim.mezo import MeZO

__all__ = ["QZO", "QuantizedLinear", "quantize_int8"]


class QuantizedLinear(nn.Module):
    r"""A linear layer with int8 weight codes :math:`\bar w` (frozen buffer) and one float
    scale per output row :math:`\Delta` (the trainable parameter): :math:`W = \Delta \odot
    \bar w`, symmetric round-to-nearest quantisation :math:`\bar w = \operatorname{round}(W
    / \Delta)`, :math:`\Delta = \max_j |W_{ij}| / 127`. The bias stays float and frozen.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        scale = weight.abs().amax(dim=1).clamp_min(torch.finfo(weight.dtype).tiny) / 127
        self.register_buffer("codes", torch.round(weight / scale[:, None]).to(torch.int8))
        self.scale = nn.Parameter(scale.clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def weight(self) -> Tensor:
        return self.codes.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight(), self.bias)


def quantize_int8(module: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` inside ``module`` (in place) by a :class:`QuantizedLinear`
    and freeze all other parameters; returns ``module``. Train ``module.parameters()`` with
    :class:`QZO` (only the scales require grad)."""
    for p in module.parameters():
        p.requires_grad_(False)
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, QuantizedLinear(child))
        else:
            quantize_int8(child)
    return module


@register("qzo")
class QZO(MeZO):
    r"""QZO: :class:`MeZO` over quantization scales, with the SPSA estimate clipped.

    .. math::
        \begin{aligned}
            &d \leftarrow \big[\ell((\Delta + \epsilon z) \odot \bar w)
                - \ell((\Delta - \epsilon z) \odot \bar w)\big] / (2\epsilon), \quad
                z \sim \mathcal{N}(0, I) \text{ over the scales (seed-regenerated)} \\
            &d' \leftarrow \operatorname{clip}(d, -C, C) \\
            &\Delta \leftarrow \Delta - \gamma \, d' z
        \end{aligned}

    The clipping bounds every step by :math:`\gamma C \lVert z \rVert` (a large
    :math:`|d|` from a quantisation-noise spike does not blow the scales up). Everything
    else -- closure, seeds, ``n_perturbations``, weight decay, the determinism check -- is
    :class:`MeZO`'s. Use :func:`quantize_int8` to turn a float model into int8 codes with
    trainable per-row scales, then ``QZO(model.parameters(), ...)``.

    Args:
        params: the scales (any parameters: QZO itself does not look at quantisation).
        lr, eps, weight_decay, n_perturbations, seed, check_determinism: as :class:`MeZO`.
        clip: :math:`C > 0`, the bound on :math:`|d|` (default: 100).

    Paper: L. Shang et al., "Fine-tuning Quantized Neural Networks with Zeroth-order
    Optimization", arXiv 2505.13430. No official code was available: the update above is
    from the paper's description; the default ``clip`` and the per-row scale granularity
    are gradkit's choices (the paper's values were not confirmed), and the scales are not
    clamped at 0 (one summary mentions :math:`\Delta \leftarrow \max(\Delta, 0)`, unverified).
    """

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3, eps: float = 1e-3,
                 weight_decay: float = 0.0, n_perturbations: int = 1, *, clip: float = 100.0,
                 seed: int | None = None, check_determinism: bool = True) -> None:
        check_positive("clip", clip)
        super().__init__(params, lr=lr, eps=eps, weight_decay=weight_decay,
                         n_perturbations=n_perturbations, seed=seed,
                         check_determinism=check_determinism)
        for group in self.param_groups:
            group["clip"] = clip
        self.defaults["clip"] = clip

    def _projected(self, estimate: float) -> float:
        bound = self.param_groups[0]["clip"]
        return min(max(estimate, -bound), bound)
