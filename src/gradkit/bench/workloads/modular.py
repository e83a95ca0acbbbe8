"""One-layer transformer on modular addition (the grokking task; ``full`` suite).

Power et al. (2022), "Grokking"; architecture after Nanda et al. (2023): tokens ``a b =``,
learned token and position embeddings, one multi-head attention block and one ReLU MLP block
with residual connections and no layer norm, logits read at the ``=`` position. A fraction of
all ``p²`` pairs is the training set; the rest is split evenly into validation and test.
Generalisation typically needs weight decay and many steps, so the target is often missed
within small budgets; a miss counts as infinite time, as in AlgoPerf. Defaults are sized for
a CPU (p = 31, 70 % of pairs for training, d_model = 32): AdamW with lr 3e-3 and weight decay
1.0 reaches 95 % validation accuracy after about 2000 full-batch steps (measured, seed 0).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gradkit.bench.workloads.base import Arrays, ArrayWorkload, cross_entropy_and_accuracy


class _OneLayerTransformer(nn.Module):
    def __init__(self, p: int, d_model: int, heads: int, d_mlp: int):
        super().__init__()
        self.embed = nn.Embedding(p + 1, d_model)
        self.pos = nn.Parameter(torch.randn(3, d_model) / d_model**0.5)
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp), nn.ReLU(), nn.Linear(d_mlp, d_model))
        self.unembed = nn.Linear(d_model, p)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.pos
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = h + self.mlp(h)
        return self.unembed(h[:, -1])


class ModularAddition(ArrayWorkload):
    """``(a + b) mod p`` with a one-layer transformer, full-batch training."""

    name = "transformer"
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, p: int = 31, train_fraction: float = 0.7, steps: int = 3000,
                 eval_every: int = 50, target: float = 0.95, d_model: int = 32, heads: int = 4,
                 d_mlp: int = 128, split_seed: int = 0, name: str | None = None):
        self.p, self.train_fraction, self.split_seed = p, train_fraction, split_seed
        self.steps, self.eval_every, self.target = steps, eval_every, target
        self.d_model, self.heads, self.d_mlp = d_model, heads, d_mlp
        self.batch_size = round(train_fraction * p * p)
        if name is not None:
            self.name = name
        self.description = (f"1-layer transformer, (a+b) mod {p}, {train_fraction:.0%} of pairs "
                            f"for training, d_model={d_model}, full batch")

    def arrays(self) -> Arrays:
        p = self.p
        a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
        tokens = torch.stack([a.flatten(), b.flatten(), torch.full((p * p,), p)], dim=1)
        labels = (a.flatten() + b.flatten()) % p
        perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(self.split_seed))
        n_train = self.batch_size
        n_val = (p * p - n_train) // 2
        tr, va, te = perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]
        return Arrays(tokens[tr], labels[tr], tokens[va], labels[va], tokens[te], labels[te])

    def build_model(self) -> nn.Module:
        return _OneLayerTransformer(self.p, self.d_model, self.heads, self.d_mlp)

    def loss_and_metric(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        return cross_entropy_and_accuracy(output, target)
