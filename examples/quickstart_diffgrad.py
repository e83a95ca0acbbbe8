"""Quickstart: train a small MLP with gradkit.optim.DiffGrad and compare with torch Adam.

    .venv/bin/python examples/quickstart_diffgrad.py [--steps 1000] [--lr 1e-2]

Task: classify points of two interleaved noisy spirals (synthetic, generated here; no
downloads). Both optimizers start from the same weights and see the same mini-batches.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import gradkit.optim


def spirals(n: int, noise: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.rand(n, generator=gen) * 3 * math.pi + 0.5
    label = torch.randint(0, 2, (n,), generator=gen)
    sign = 1.0 - 2.0 * label.float()
    xy = torch.stack([sign * t * torch.cos(t), sign * t * torch.sin(t)], dim=1) / 5
    return xy + noise * torch.randn(n, 2, generator=gen), label


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, 2))


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(x)
        return (nn.functional.cross_entropy(logits, y).item(),
                (logits.argmax(1) == y).float().mean().item())


def train(name: str, steps: int, lr: float, data) -> dict[str, float]:
    x_train, y_train, x_test, y_test = data
    model = make_model()
    opt = gradkit.optim.create(name, model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    before = evaluate(model, x_train, y_train)[0]
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (128,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
        opt.step()
    seconds = time.perf_counter() - start
    train_loss = evaluate(model, x_train, y_train)[0]
    test_loss, test_acc = evaluate(model, x_test, y_test)
    return dict(before=before, train=train_loss, test=test_loss, acc=test_acc, s=seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    data = (*spirals(2000, 0.05, gen), *spirals(1000, 0.05, gen))
    print(f"two-spirals MLP, {args.steps} steps of batch 128, lr={args.lr}")
    print(f"{'optimizer':10s} {'loss before':>11s} {'train loss':>10s} {'test loss':>9s} "
          f"{'test acc':>8s} {'time s':>6s}")
    for name in ("diffgrad", "adam"):
        r = train(name, args.steps, args.lr, data)
        print(f"{name:10s} {r['before']:11.4f} {r['train']:10.4f} {r['test']:9.4f} "
              f"{r['acc']:8.3f} {r['s']:6.2f}")


if __name__ == "__main__":
    main()
