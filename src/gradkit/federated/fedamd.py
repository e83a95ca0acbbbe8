r"""FedAMD: anchor sampling for federated learning with partial participation.

Wu et al., "Anchor Sampling for Federated Learning with Partial Client Participation",
ICML 2023. The server keeps a table G[i] of the latest large-batch gradient of every client
(N×d), filled at w_0 by a full-participation warm-up. Round t (numbered from 0):

1. v_t = (1/N) Σ_i G[i]  (the "bullseye", before this round's anchors report);
2. S_t: ``clients_per_round`` clients drawn uniformly. With ``anchor_prob`` p < 1 each of
   them is an **anchor** independently with probability p (constant setting); with an
   integer p ≥ 2 all of them are anchors when t mod p = 0, miners otherwise (periodic);
3. an anchor replaces G[i] by its large-batch gradient at w_t (batch
   ``anchor_batch_size``) and sends no model update;
4. a miner runs K SARAH steps from v_t, on minibatches ξ_k::

       w^0 = w_t;  v^0 = v_t
       w^{k+1} = w^k − η_l·v^k
       v^{k+1} = v^k + ∇f_i(w^{k+1}; ξ_k) − ∇f_i(w^k; ξ_k)     (the same minibatch)

   and sends Δ_i = w^K − w_t;
5. w_{t+1} = w_t + η_g · rule(Δ_i over the miners) (Mean = the paper's average; any gradkit
   aggregator plugs in); no miner, no change. The server step is the torch optimizer of
   :class:`~gradkit.federated.simulator.FederatedSimulator` (``SGD(lr=η_g)``).

Choices, against the released code (``HarliWu/FedAMD``, whose driver does not run as
published): p = 1 is refused (there it makes nobody an anchor, freezing the table); the
update is not divided by K (``normalize_by_steps=False``); ``local_steps`` counts SARAH
steps. Batch-norm running statistics are not special-cased (use models without them).
Miners train one after another (no vmap path); the round record has no training loss (NaN)
and lists the round's ``anchors``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import grad

from gradkit.distributed import _validation as V
from gradkit.distributed.simulator import (
    unflatten_into_grads,
    worker_generator,
    worker_gradient,
)
from gradkit.federated.participation import UniformSampling
from gradkit.federated.simulator import FederatedSimulator

__all__ = ["FedAMD", "sarah_steps"]

#: random stream of the anchor coin flips
ANCHOR_STREAM = 4


def sarah_steps(loss: Callable[..., Tensor], params: dict[str, Tensor],
                buffers: dict[str, Tensor], v0: dict[str, Tensor], batches: list[tuple],
                lr: float) -> tuple[dict[str, Tensor], list[tuple[dict, dict]]]:
    """K = len(batches) + 1 SARAH steps from ``params`` with initial direction ``v0``.

    ``loss(params, buffers, x, y)``; batch k (k = 0..K−2) is ξ_k of the module docstring.
    Returns the final parameters w^K and the trace [(v^k, w^{k+1})] for k = 0..K−1.
    """
    w, v, trace = dict(params), dict(v0), []
    g = grad(loss)
    for k in range(len(batches) + 1):
        w_next = {n: w[n] - lr * v[n] for n in w}
        trace.append((v, w_next))
        if k < len(batches):
            x, y = batches[k]
            new, old = g(w_next, buffers, x, y), g(w, buffers, x, y)
            v = {n: v[n] + new[n] - old[n] for n in v}
        w = w_next
    return w, trace


class FedAMD(FederatedSimulator):
    """FedAMD on the federated simulator (module docstring for the rule).

    Args:
        model, loss_fn, clients: as :class:`FederatedSimulator`.
        clients_per_round: |S_t| (uniform sampling without replacement).
        anchor_prob: p in [0, 1) (each participant an anchor with probability p), or an
            integer ≥ 2 (periodic: all anchors every p-th round). p = 1 is refused.
        local_lr: η_l of the SARAH steps (reference default 0.01).
        local_steps: K SARAH steps (reference default 10).
        batch_size: the miners' minibatch (reference 64).
        anchor_batch_size: the anchors' (and warm-up's) batch; None = the client's data.
        server_optimizer: default ``SGD(lr=1.0)`` = η_g 1; ``aggregator`` default Mean.
        seed, eval_data, metric_fn: as :class:`FederatedSimulator`.
    """

    def __init__(self, model, loss_fn, clients, *, clients_per_round: int,
                 anchor_prob: float = 0.2, local_lr: float = 0.01, local_steps: int = 10,
                 batch_size: int | None = 64, anchor_batch_size: int | None = None,
                 **kwargs: Any):
        if isinstance(anchor_prob, bool) or not isinstance(anchor_prob, (int, float)) or \
                anchor_prob < 0 or anchor_prob == 1 or (anchor_prob > 1 and
                                                        anchor_prob != int(anchor_prob)):
            raise ValueError(f"Invalid anchor_prob value: {anchor_prob} (FedAMD needs p in "
                             "[0, 1) or an integer period >= 2; p = 1 would make no client "
                             "an anchor)")
        self.anchor_prob = anchor_prob
        self.local_lr = V.check_real("FedAMD", "local_lr", local_lr, positive=True)
        if anchor_batch_size is not None:
            V.check_count("FedAMD", "anchor_batch_size", anchor_batch_size, minimum=1)
        self.anchor_batch_size = anchor_batch_size
        super().__init__(model, loss_fn, clients, local_steps=local_steps,
                         batch_size=batch_size,
                         participation=UniformSampling(clients_per_round), **kwargs)
        self.table = torch.stack([self._anchor_gradient(i) for i in range(self.n)])

    def _anchor_gradient(self, i: int) -> Tensor:
        x, y = self.clients[i]
        g, _ = worker_gradient(self.model, x, y, self.loss_fn, worker=i, round=self.round,
                               seed=self.seed, batch_size=self.anchor_batch_size)
        return g

    def anchors(self, selected: list[int]) -> list[int]:
        """Which of this round's participants are anchors."""
        p = self.anchor_prob
        if p >= 2:
            return list(selected) if self.round % int(p) == 0 else []
        gen = worker_generator(self.seed, 0, self.round, ANCHOR_STREAM)
        coins = torch.rand(len(selected), generator=gen, dtype=torch.float64)
        return [i for i, c in zip(selected, coins) if c < p]

    def _train(self, clients, anchor, vectorized):
        # one miner (the loop path): SARAH from v_t
        (i,) = clients
        buffers = {k: b.detach() for k, b in self.model.named_buffers()}
        batches = [(xs[0], ys[0]) for xs, ys in self._batches([i], self.local_steps - 1)]
        w, _ = sarah_steps(self._loss, anchor, buffers, self._unflatten(self._bullseye),
                           batches, self.local_lr)
        delta = torch.cat([(w[k] - anchor[k]).reshape(1, -1) for k in w], dim=1)
        return delta, torch.zeros(1)

    def step(self) -> dict[str, Any]:
        """One FedAMD round; the record adds ``anchors``."""
        self.model.train()
        self._bullseye = self.table.mean(dim=0)
        mask = self.participation.sample(self.n, self.round, self.seed)
        selected = torch.nonzero(mask).flatten().tolist()
        anchors = self.anchors(selected)
        miners = [i for i in selected if i not in set(anchors)]
        deltas, losses, failed = {}, {}, {}
        anchor = {k: p.detach().clone() for k, p in zip(self.names, self.params)}
        for i in miners:
            self._train_one(i, anchor, deltas, losses, failed)
        for i in anchors:
            try:
                g = self._anchor_gradient(i)
            except Exception as error:
                failed[i] = f"{type(error).__name__}: {error}"
                continue
            if bool(torch.isfinite(g).all()):
                self.table[i] = g
            else:
                failed[i] = "non-finite anchor gradient (NaN or inf)"
        self.failures.extend((self.round, i, why) for i, why in sorted(failed.items()))
        ok = sorted(deltas)
        if ok:
            update = self.aggregator(torch.stack([deltas[i] for i in ok]))
            self.server_optimizer.zero_grad(set_to_none=True)
            unflatten_into_grads(-update, self.params)
            self.server_optimizer.step()
        record = {"round": self.round, "participants": ok, "anchors": sorted(anchors),
                  "failed": failed, "train_loss": float("nan")}
        self.round += 1
        return record
