"""ZO2 (Wang et al., 2025): MeZO run block by block -- both perturbed forward passes while a
block is resident, the update deferred to the block's next visit.

Same numbers as :class:`~gradkit.optim.MeZO` (n = 1): after K steps and :meth:`ZO2.flush`
the parameters equal K MeZO steps bit for bit, when MeZO sees the blocks' parameters in the
same order and the same base seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradkit._checks import check_lr, check_non_negative, check_positive
from gradkit.optim.mezo import (
    SEED_RANGE,
    _Directions,
    _loss_value,
    _single_tensor_mezo_perturb,
    _single_tensor_mezo_update,
    perturbation_seeds,
)

__all__ = ["ZO2"]


class ZO2:
    r"""MeZO's ZO-SGD step as a block-wise schedule over a network ``blocks[0] → … → blocks[-1]
    → loss_fn``, with one visit per block per step.

    .. math::
        \begin{aligned}
            &\textbf{step } t \textbf{ (one pass over the blocks } k = 1..K\textbf{)}: \\
            &\hspace{5mm} \theta_k \leftarrow \theta_k - \gamma (d_{t-1} z_{t-1,k}
                + \omega \theta_k) \quad (\text{deferred update of step } t-1) \\
            &\hspace{5mm} \theta_k \leftarrow \theta_k + \epsilon z_{t,k}, \
                h^+_k \leftarrow B_k(h^+_{k-1}); \quad
                \theta_k \leftarrow \theta_k - 2\epsilon z_{t,k}, \
                h^-_k \leftarrow B_k(h^-_{k-1}); \quad
                \theta_k \leftarrow \theta_k + \epsilon z_{t,k} \\
            &\hspace{5mm} d_t \leftarrow (\ell(h^+_K) - \ell(h^-_K)) / (2\epsilon)
                \quad (\text{pending until step } t+1 \text{ or } \texttt{flush()})
        \end{aligned}

    :math:`z_{t,k}` is block k's piece of one normal stream: a generator seeded with step
    t's seed is threaded through the blocks (its state is saved before a block and restored
    for the block's second and third sweeps), so the pieces are the numbers a whole-model
    MeZO step draws. Each block is touched once per step (update, ±ε passes and restore
    while it is hot in cache or resident in fast memory); the two hidden-state streams
    :math:`h^+, h^-` flow side by side.

    ``step`` returns :math:`\ell^+`. The last update stays pending: call :meth:`flush`
    before evaluating, checkpointing with the model weights alone, or at the end; the
    pending pair (step count, :math:`d`) is in :meth:`state_dict`, so a checkpoint of both
    resumes exactly. A non-finite :math:`d` is dropped (set to 0: the update is skipped),
    as the reference trainer's hook does.

    Args:
        blocks: the modules applied in order; their parameters with ``requires_grad`` are
            trained (embeddings or a head outside ``blocks`` go into ``loss_fn`` and stay
            fixed).
        lr: learning rate :math:`\gamma` (default: 1e-3, the reference config's).
        eps: perturbation scale :math:`\epsilon` (default: 1e-3).
        weight_decay: :math:`\omega` (default: 0; the ZO2 config uses 0.1 with biases and
            norms exempt by name -- pass ``no_decay`` for that).
        no_decay: predicate on a parameter's qualified name (``"2.bias"``: block index,
            then the name inside the block) that exempts it from decay (default: none).
        seed: base seed, as :class:`~gradkit.optim.MeZO`'s (default: drawn from torch's
            default generator).

    Paper: L. Wang et al., "ZO2: Scalable Zeroth-Order Fine-Tuning for Extremely Large
    Language Models with Limited GPU Memory", arXiv 2503.12668. Matches liangyuwang/zo2
    ``zo2/optimizer/mezo_sgd/zo2.py``: the fused dual forward per block, the update of step
    t applied at step t+1 right before the block's new perturbation, generator-state
    threading across blocks. Not provided: CPU↔GPU offloading with CUDA streams and
    reduced-precision offload (on one device the schedule gives the cache-locality part).
    """

    def __init__(self, blocks: Sequence[nn.Module], lr: float = 1e-3, eps: float = 1e-3,
                 weight_decay: float = 0.0, *, no_decay: Callable[[str], bool] | None = None,
                 seed: int | None = None) -> None:
        check_lr(lr)
        check_positive("eps", eps)
        check_non_negative("weight_decay", weight_decay)
        if seed is None:
            seed = int(torch.randint(0, SEED_RANGE, ()).item())
        self.blocks = list(blocks)
        self.lr, self.eps, self.weight_decay, self.seed = float(lr), eps, weight_decay, seed
        self._params = [[p for p in b.parameters() if p.requires_grad] for b in self.blocks]
        self._decays = [
            [0.0 if no_decay is not None and no_decay(f"{k}.{name}") else weight_decay
             for name, p in b.named_parameters() if p.requires_grad]
            for k, b in enumerate(self.blocks)]
        self._all = [p for ps in self._params for p in ps]
        if not self._all:
            raise ValueError("ZO2 got no trainable parameters in blocks")
        self._scratch: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self.step_count = 0
        self.pending: float | None = None  # d of step `step_count`, not yet applied

    def _draw(self, step: int) -> _Directions:
        return _Directions(self._all, perturbation_seeds(self.seed, step, 1)[0], self._scratch)

    @torch.no_grad()
    def step(self, inputs: Any, loss_fn: Callable[[Any], object]) -> float:
        """One step: ``loss_fn(blocks[-1](…blocks[0](inputs)))`` at :math:`\\theta \\pm
        \\epsilon z`; applies the previous step's update on the way. Returns
        :math:`\\ell^+`."""
        previous = self._draw(self.step_count) if self.pending is not None else None
        current = self._draw(self.step_count + 1)
        h_plus = h_minus = inputs
        updated, shift, mark, params = 0, 0.0, None, []  # for the clean-up on errors
        try:
            for block, params, decays in zip(self.blocks, self._params, self._decays):
                if previous is not None:
                    self._update(params, decays, previous)
                updated += 1
                mark = current.get_state()
                _single_tensor_mezo_perturb(params, current, self.eps)
                shift = self.eps
                h_plus = block(h_plus)
                current.set_state(mark)
                _single_tensor_mezo_perturb(params, current, -2 * self.eps)
                shift = -self.eps
                h_minus = block(h_minus)
                current.set_state(mark)
                _single_tensor_mezo_perturb(params, current, self.eps)
                shift = 0.0
        except BaseException:
            # leave θ as after a complete deferred update and no perturbation
            if shift:
                current.set_state(mark)
                _single_tensor_mezo_perturb(params, current, -shift)
            if previous is not None:
                for params, decays in zip(self._params[updated:], self._decays[updated:]):
                    self._update(params, decays, previous)
                self.pending = None
            raise
        self.pending = None
        loss_plus = _loss_value(loss_fn(h_plus))
        loss_minus = _loss_value(loss_fn(h_minus))
        projected = (loss_plus - loss_minus) / (2 * self.eps)
        self.step_count += 1
        self.pending = projected if math.isfinite(projected) else 0.0
        return loss_plus

    @torch.no_grad()
    def flush(self) -> None:
        """Apply the pending update (no-op when none)."""
        if self.pending is None:
            return
        draw = self._draw(self.step_count)
        for params, decays in zip(self._params, self._decays):
            self._update(params, decays, draw)
        self.pending = None

    def _update(self, params: list[Tensor], decays: list[float], draw: _Directions) -> None:
        _single_tensor_mezo_update(params, draw, self.pending, lrs=[self.lr] * len(params),
                                   weight_decays=decays)

    def state_dict(self) -> dict[str, Any]:
        """Step count, pending :math:`d` and base seed (the hyperparameters are the
        constructor's)."""
        return {"step": self.step_count, "pending": self.pending, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count, self.pending, self.seed = state["step"], state["pending"], state["seed"]
