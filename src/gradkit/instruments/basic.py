"""Cheap per-step quantities: norms, update size, logit statistics, softmax collapse.

Every function here is pure (reads tensors, returns Python floats or tensors) and usable
without a :class:`~gradkit.instruments.Monitor`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import vmap

Tensors = Sequence[Tensor] | Mapping[str, Tensor]


def _values(tensors: Tensors) -> list[Tensor]:
    return list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)


def global_norm_tensor(tensors: Tensors, ord: float = 2) -> Tensor:
    """The ``ord``-norm of all tensors joined, as a 0-d float64 tensor on their device (no
    synchronisation): the one gradient-norm computation of the Monitor's ``GradNorm`` and
    of :class:`gradkit.schedules.GradNormRecorder`.

    Args:
        tensors: a sequence or ``{name: tensor}`` mapping of tensors (mixed dtypes allowed:
            per-tensor norms are combined in float64).
        ord: the norm's order (2 or 1, any order ``torch._foreach_norm`` accepts).

    Example::

        >>> import torch
        >>> from gradkit.instruments.basic import global_norm_tensor
        >>> global_norm_tensor([torch.tensor([3.0]), torch.tensor([-4.0])], ord=1)
        tensor(7., dtype=torch.float64)
    """
    values = _values(tensors)
    if not values:
        raise ValueError("a global norm needs at least one tensor")
    norms = torch._foreach_norm([v.detach() for v in values], ord)
    if len({n.dtype for n in norms}) == 1:  # one conversion instead of one per tensor
        stacked = torch.stack(norms).to(torch.float64)
    else:
        stacked = torch.stack([n.to(torch.float64) for n in norms])
    return torch.linalg.vector_norm(stacked, ord)


def global_norm(tensors: Tensors) -> float:
    """``sqrt(Σ_t ‖t‖²)`` over a set of tensors (the global gradient norm of ``p.grad``s).

    Args:
        tensors: a sequence or ``{name: tensor}`` mapping of tensors.

    Example::

        >>> import torch
        >>> from gradkit.instruments import global_norm
        >>> global_norm({"w": torch.tensor([3.0]), "b": torch.tensor([4.0])})
        5.0
    """
    return float(global_norm_tensor(tensors, 2).item())


def layer_norms(tensors: Mapping[str, Tensor]) -> dict[str, float]:
    """``{name: ‖t‖}`` for each tensor (per-layer gradient or weight norms).

    Args:
        tensors: ``{name: tensor}``.

    Example::

        >>> import torch
        >>> from gradkit.instruments import layer_norms
        >>> layer_norms({"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([-2.0])})
        {'w': 5.0, 'b': 2.0}
    """
    names = list(tensors)
    norms = torch.stack(torch._foreach_norm([tensors[n].detach() for n in names])).tolist()
    return dict(zip(names, norms))


def update_size(before: Tensors, after: Tensors) -> float:
    """``‖θ_after − θ_before‖`` over all tensors (the size of one optimizer update).

    Args:
        before: the parameters before the step (a sequence or ``{name: tensor}``).
        after: the parameters after it, in the same order.

    Example::

        >>> import torch
        >>> from gradkit.instruments import update_size
        >>> update_size([torch.tensor([1.0, 1.0])], [torch.tensor([4.0, 5.0])])
        5.0
    """
    diffs = torch._foreach_sub([a.detach() for a in _values(after)], _values(before))
    return global_norm(diffs)


def update_ratio(before: Tensors, after: Tensors) -> float:
    """``‖θ_after − θ_before‖ / ‖θ_before‖`` (update/weight ratio; ``inf`` if θ_before = 0).

    Args:
        before: the parameters before the step (a sequence or ``{name: tensor}``).
        after: the parameters after it, in the same order.

    Example::

        >>> import torch
        >>> from gradkit.instruments import update_ratio
        >>> update_ratio([torch.tensor([3.0, 4.0])], [torch.tensor([3.0, 4.5])])
        0.1
    """
    num, den = update_size(before, after), global_norm(before)
    return num / den if den > 0 else float("inf")


def layer_update_ratios(before: Mapping[str, Tensor], after: Mapping[str, Tensor]
                        ) -> dict[str, float]:
    """Per-tensor ``‖Δθ_l‖ / ‖θ_l‖`` (``inf`` for an all-zero tensor that moved).

    Args:
        before: ``{name: tensor}`` before the step.
        after: ``{name: tensor}`` after it.

    Example::

        >>> import torch
        >>> from gradkit.instruments import layer_update_ratios
        >>> before = {"w": torch.tensor([2.0]), "b": torch.tensor([0.0])}
        >>> layer_update_ratios(before, {"w": torch.tensor([2.5]), "b": torch.tensor([0.1])})
        {'w': 0.25, 'b': inf}
    """
    names = list(before)
    diffs = torch._foreach_sub([after[n].detach() for n in names], [before[n] for n in names])
    num = torch.stack(torch._foreach_norm(diffs))
    den = torch.stack(torch._foreach_norm([before[n] for n in names]))
    return dict(zip(names, (num / den).tolist()))


def nlm_alignment(grads: Tensors, params: Tensors) -> float:
    """Cosine between the descent direction ``−g`` and the weights ``θ`` (all tensors joined).

    The "naive loss minimization" direction of Prieto et al. (arXiv 2501.04697) is ``θ``
    itself: for a positively homogeneous network, scaling the weights up scales the logits and
    lowers a cross-entropy loss that already classifies correctly without changing any
    prediction. ``nlm_alignment → 1`` means a gradient step mostly inflates the weights.
    Sign convention (our choice): the *descent* direction is compared, so a plain GD step
    ``θ ← θ − η g`` grows ``‖θ‖`` exactly when the value is positive.

    Args:
        grads: the gradients (a sequence or ``{name: tensor}``).
        params: the parameters, in the same order.

    Example::

        >>> import torch
        >>> from gradkit.instruments import nlm_alignment
        >>> nlm_alignment([torch.tensor([-2.0, 0.0])], [torch.tensor([1.0, 0.0])])
        1.0
    """
    g = torch.cat([t.detach().reshape(-1) for t in _values(grads)])
    w = torch.cat([t.detach().reshape(-1) for t in _values(params)])
    den = float(torch.linalg.vector_norm(g) * torch.linalg.vector_norm(w))
    return float(-(g @ w)) / den if den > 0 else float("nan")


def max_abs_logit(logits: Tensor) -> float:
    """``max |z|`` over a batch of logits (the quantity whose growth precedes instabilities,
    Wortsman et al., "Small-scale proxies for large-scale Transformer training
    instabilities").

    Args:
        logits: a tensor of logits, any shape.

    Example::

        >>> import torch
        >>> from gradkit.instruments import max_abs_logit
        >>> max_abs_logit(torch.tensor([[1.0, -7.5], [2.0, 0.0]]))
        7.5
    """
    return float(logits.detach().abs().max().item())


def softmax_collapse_fraction(logits: Tensor) -> float:
    r"""Fraction of examples whose softmax has collapsed in the logits' own float precision.

    .. math::
        z' = z - \max_j z_j, \qquad S = \sum_j \exp(z'_j), \qquad
        \mathrm{SC} = \operatorname{mean}_n [S_n = 1]

    ``S == 1`` exactly means every non-maximal term was absorbed by rounding, so the
    probability of the top class is exactly 1 and its cross-entropy gradient vanishes.
    Matches ``compute_softmax_collapse`` in the official code of Prieto et al. (arXiv
    2501.04697, ``logger.py``): computed in the dtype of ``logits`` (e.g. fp32), never upcast.

    Args:
        logits: ``(..., C)`` logits; all leading dimensions count as examples.

    Example::

        >>> import torch
        >>> from gradkit.instruments import softmax_collapse_fraction
        >>> softmax_collapse_fraction(torch.tensor([[1000.0, 0.0, 0.0], [1.0, 0.0, 0.5]]))
        0.5
    """
    z = logits.detach()
    shifted = z - z.max(dim=-1, keepdim=True).values
    s = torch.exp(shifted).sum(dim=-1)
    return float((s == 1).float().mean().item())


def zero_loss_fraction(per_example_losses: Tensor) -> float:
    """Fraction of examples whose loss is exactly 0 (companion of the softmax-collapse
    fraction, ``zero_terms`` in the official grokking code).

    Args:
        per_example_losses: a ``(B,)`` tensor of losses.

    Example::

        >>> import torch
        >>> from gradkit.instruments import zero_loss_fraction
        >>> zero_loss_fraction(torch.tensor([0.0, 0.3, 0.0, 1.2]))
        0.5
    """
    return float((per_example_losses.detach() == 0).float().mean().item())


_F = torch.nn.functional
_UNREDUCED = {_F.cross_entropy, _F.nll_loss, _F.mse_loss, _F.l1_loss, _F.smooth_l1_loss,
              _F.huber_loss, _F.binary_cross_entropy, _F.binary_cross_entropy_with_logits,
              _F.soft_margin_loss}
_UNREDUCED_MODULES = (nn.CrossEntropyLoss, nn.NLLLoss, nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss,
                      nn.HuberLoss, nn.BCELoss, nn.BCEWithLogitsLoss, nn.SoftMarginLoss)


def _unreduced(loss_fn: Callable[[Tensor, Tensor], Tensor], out: Tensor, targets: Tensor
               ) -> Tensor | None:
    """torch's own ``reduction="none"`` for its mean-reduced losses (no vmap needed)."""
    try:
        known = loss_fn in _UNREDUCED
    except TypeError:  # unhashable callable
        known = False
    if known:
        full = loss_fn(out, targets, reduction="none")
    elif (type(loss_fn) in _UNREDUCED_MODULES and getattr(loss_fn, "reduction", "") == "mean"
          and getattr(loss_fn, "weight", None) is None):  # class weights change the mean
        clone = copy.copy(loss_fn)
        clone.reduction = "none"
        full = clone(out, targets)
    else:
        return None
    return full.reshape(full.shape[0], -1).mean(1) if full.dim() > 1 else full


def per_example_losses(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                       inputs: Tensor, targets: Tensor, *, outputs: Tensor | None = None
                       ) -> Tensor:
    """Per-example losses ``loss_fn(f(x_i)[None], y_i[None])`` as a ``(B,)`` tensor.

    One batched forward pass (or the given ``outputs``), then torch's ``reduction="none"``
    for its mean-reduced losses (``F.cross_entropy``, ``nn.MSELoss()``, ...; the mean over
    non-batch dimensions is taken, as the loss of a batch of one would), else a ``vmap`` of
    ``loss_fn`` over examples, so any mean-reduced ``loss_fn`` works. No gradient is recorded.

    Args:
        model: the network.
        loss_fn: its mean-reduced ``loss_fn(outputs, targets)``.
        inputs: a batch of inputs.
        targets: their targets.
        outputs: the model's outputs on ``inputs``, if already computed.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from gradkit.instruments import per_example_losses
        >>> logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
        >>> per_example_losses(nn.Identity(), nn.functional.cross_entropy, logits,
        ...                    torch.tensor([0, 0])).round(decimals=4)
        tensor([0.6931, 0.1269])
    """
    with torch.no_grad():
        out = model(inputs) if outputs is None else outputs.detach()
        fast = _unreduced(loss_fn, out, targets)
        if fast is not None:
            return fast
        return vmap(lambda o, y: loss_fn(o.unsqueeze(0), y.unsqueeze(0)))(out, targets)
