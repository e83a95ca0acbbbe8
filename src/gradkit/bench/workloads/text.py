"""A small character-level transformer language model on real English text (offline).

The text is the set of dataset descriptions that scikit-learn ships inside its wheel
(``sklearn/datasets/descr/*.rst``: about 80 kB of English prose with a few tables), read
from the installed package -- never downloaded. The files are joined in name order; the
first 80 % of the characters train, the next 10 % validate and the last 10 % test
(contiguous blocks, so validation text is unseen). The SHA-256 of the text is part of the
workload's description, hence of every trial key: a scikit-learn release that edits these
files gives new trials instead of silently mixing with old ones.

Model: a GPT-style decoder (pre-LayerNorm blocks of causal multi-head self-attention and a
GELU MLP, learned position embeddings, untied output head). Training windows are the
non-overlapping ``context``-character windows of the training block, shuffled per epoch;
the loss is the mean next-character cross-entropy. Metric: validation cross-entropy in bits
per character (lower is better) over every non-overlapping window of the validation block.
Defaults (1 layer, d_model 32, 150 steps of 16 × 32 characters) are sized so one trial takes
well under a second on one CPU thread; the target of 4.1 bits/char (the unigram entropy of
the text is about 4.6) is reached within the budget by Adam at lr 1e-2 (step 50) and SGD with
momentum 0.9 at lr 0.1 (step 100), not by Adam at lr 1e-3 (measured, seed 0). ``--suite
full`` uses 2 layers, d_model 64, context 64 and 600 steps (its target, 3.6, is not
calibrated yet).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gradkit.bench.workloads.base import Arrays, ArrayWorkload
from gradkit.errors import require_extra


def corpus() -> str:
    """The English text of scikit-learn's dataset descriptions, joined in file-name order."""
    require_extra("sklearn", "bench", "the char-lm workload")
    import sklearn.datasets

    folder = Path(sklearn.datasets.__file__).parent / "descr"
    files = sorted(folder.glob("*.rst"))
    if not files:
        raise RuntimeError(f"no dataset descriptions found in {folder}")
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


class _Block(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, h: Tensor) -> Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return h + self.mlp(self.ln2(h))


class CharTransformer(nn.Module):
    """Decoder-only transformer over characters: logits ``(batch, time, vocab)``."""

    def __init__(self, vocab: int, context: int, d_model: int, heads: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(context, d_model) * 0.02)
        self.blocks = nn.Sequential(*(_Block(d_model, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[-1]]
        return self.head(self.ln(self.blocks(h)))


class CharLM(ArrayWorkload):
    """Next-character prediction on scikit-learn's dataset descriptions (see module doc)."""

    name = "char-lm"
    metric = "bits/char"
    higher_is_better = False

    def __init__(self, steps: int = 150, eval_every: int = 25, target: float = 4.1,
                 batch_size: int = 16, context: int = 32, d_model: int = 32, heads: int = 4,
                 layers: int = 1, name: str | None = None):
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
        self.steps, self.eval_every, self.target = steps, eval_every, target
        self.batch_size, self.context = batch_size, context
        self.d_model, self.heads, self.layers = d_model, heads, layers
        if name is not None:
            self.name = name
        text = corpus()
        self.text_sha256 = hashlib.sha256(text.encode()).hexdigest()
        self.vocab = sorted(set(text))
        self.description = (
            f"{layers}-layer character transformer (d_model={d_model}, {heads} heads, context "
            f"{context}) on scikit-learn's dataset descriptions ({len(text)} characters, "
            f"{len(self.vocab)} symbols, sha256 {self.text_sha256[:12]})")

    def arrays(self) -> Arrays:
        text = corpus()
        index = {c: i for i, c in enumerate(self.vocab)}
        ids = torch.tensor([index.get(c, 0) for c in text], dtype=torch.long)
        n = len(ids)
        cuts = (0, int(0.8 * n), int(0.9 * n), n)
        splits = []
        for start, stop in itertools.pairwise(cuts):
            block = ids[start:stop]
            count = (len(block) - 1) // self.context
            x = block[: count * self.context].view(count, self.context)
            y = block[1 : count * self.context + 1].view(count, self.context)
            splits += [x, y]
        return Arrays(*splits)

    def build_model(self) -> nn.Module:
        return CharTransformer(len(self.vocab), self.context, self.d_model, self.heads,
                               self.layers)

    def loss_and_metric(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        loss = F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
        return loss, loss.detach() / math.log(2.0)
