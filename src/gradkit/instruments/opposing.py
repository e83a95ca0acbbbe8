"""Opposing-signal groups (Rosenfeld & Risteski, "Outliers with Opposing Signals Have an
Outsized Effect on Neural Network Optimization", ICLR 2024, arXiv 2311.04163).

Procedure (the paper's "per-step largest loss change"): record the per-example training
losses of a probe set before and after an optimizer step, rank the examples by
``Δℓᵢ = ℓᵢ(after) − ℓᵢ(before)``, and report the ``k`` largest increases and the ``k``
largest decreases with their indices: the two paired groups pulled in opposite directions
by a shared feature. Choices (the paper's exact k, window and probe set are NOT verified):
``k = 8`` by default, a window of one optimizer step, and the probe set is whatever batch
the caller gives (the current mini-batch in the Monitor unless a fixed probe set is set).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class OpposingSignals(NamedTuple):
    increase_index: list[int]  #: indices of the top-k loss increases, largest first
    increase_delta: list[float]
    decrease_index: list[int]  #: indices of the top-k loss decreases, largest drop first
    decrease_delta: list[float]
    fraction_increased: float  #: fraction of examples whose loss went up


def opposing_signals(loss_before: Tensor, loss_after: Tensor, k: int = 8,
                     index: Tensor | None = None) -> OpposingSignals:
    """Top-``k`` per-example loss increases and decreases between two evaluations (the
    opposing-signal groups of Rosenfeld & Risteski, ICLR 2024).

    Only examples whose loss actually rose (fell) enter the increase (decrease) list.

    Args:
        loss_before: ``(N,)`` per-example losses before the step(s).
        loss_after: ``(N,)`` per-example losses after.
        k: how many of each to return.
        index: ``(N,)`` example ids for the positions (e.g. dataset indices of the batch);
            default the positions.

    Example::

        >>> import torch
        >>> from gradkit.instruments import opposing_signals
        >>> res = opposing_signals(torch.tensor([1.0, 1.0, 1.0, 1.0]),
        ...                        torch.tensor([1.5, 0.2, 1.0, 1.1]), k=1,
        ...                        index=torch.tensor([10, 11, 12, 13]))
        >>> res.increase_index, res.decrease_index, res.fraction_increased
        ([10], [11], 0.5)
    """
    if loss_before.shape != loss_after.shape or loss_before.dim() != 1:
        raise ValueError(f"need two (N,) loss vectors, got {tuple(loss_before.shape)} and "
                         f"{tuple(loss_after.shape)}")
    if k < 1:
        raise ValueError(f"Invalid k: {k}")
    delta = (loss_after.detach() - loss_before.detach()).double()
    ids = torch.arange(delta.numel()) if index is None else index.detach().reshape(-1).cpu()
    order = torch.argsort(delta, descending=True, stable=True)
    up = order[:k][delta[order[:k]] > 0]
    down_order = torch.argsort(delta, stable=True)
    down = down_order[:k][delta[down_order[:k]] < 0]
    return OpposingSignals(
        ids[up.cpu()].tolist(), delta[up].tolist(), ids[down.cpu()].tolist(),
        delta[down].tolist(), float((delta > 0).double().mean()),
    )
