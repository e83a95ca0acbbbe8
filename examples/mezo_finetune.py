"""Fine-tune a pretrained classifier with MeZO (forward passes only) on a shifted task.

    PYTHONPATH=src .venv/bin/python examples/mezo_finetune.py [--steps 1500] [--lr 2e-3]

Pretraining: an MLP learns scikit-learn's built-in 8x8 digits (``load_digits``, no download)
with backprop and Adam. Shifted task: the same digits with every image moved one pixel to
the right and its contrast inverted (16 - pixel), on which the pretrained model does badly.
Fine-tuning: ``gradkit.optim.MeZO`` with the model in eval mode, the loss evaluated by a
closure; no backward pass, no gradients, memory of inference. The training loss (mean of
the last 100 steps) and the held-out accuracy are printed as fine-tuning proceeds.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from gradkit.optim import MeZO


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("this example needs scikit-learn: pip install gradkit[bench]") from None
    data = load_digits()
    return torch.tensor(data.images, dtype=torch.float32), torch.tensor(data.target)


def shift(images: torch.Tensor) -> torch.Tensor:
    """The shifted task: one pixel to the right, contrast inverted."""
    moved = torch.zeros_like(images)
    moved[:, :, 1:] = images[:, :, :-1]
    return 16.0 - moved


def features(images: torch.Tensor) -> torch.Tensor:
    return images.reshape(len(images), -1) / 16.0


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()

    torch.manual_seed(0)
    images, labels = digits()
    order = torch.randperm(len(labels))
    train, test = order[:1400], order[1400:]
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    loss_fn = nn.CrossEntropyLoss()

    # pretraining with backprop on the original task
    x, y = features(images[train]), labels[train]
    adam = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        batch = torch.randint(0, len(y), (args.batch,))
        adam.zero_grad()
        loss_fn(model(x[batch]), y[batch]).backward()
        adam.step()
    model.eval()
    x_test = features(images[test])
    print(f"pretrained: accuracy {accuracy(model, x_test, labels[test]):.3f} on the original "
          "task")

    # zeroth-order fine-tuning on the shifted task
    xs, xs_test = features(shift(images[train])), features(shift(images[test]))
    print(f"shifted task before fine-tuning: accuracy "
          f"{accuracy(model, xs_test, labels[test]):.3f}")
    opt = MeZO(model.parameters(), lr=args.lr, eps=args.eps, seed=0)
    gen = torch.Generator().manual_seed(1)
    recent: list[float] = []
    print(f"{'step':>6}{'train loss':>12}{'test acc':>10}")
    for step in range(1, args.steps + 1):
        batch = torch.randint(0, len(y), (args.batch,), generator=gen)
        recent.append(opt.step(lambda b=batch: loss_fn(model(xs[b]), y[b])))
        if step == 1 or step % 250 == 0:
            mean = sum(recent[-100:]) / len(recent[-100:])
            print(f"{step:>6}{mean:>12.4f}{accuracy(model, xs_test, labels[test]):>10.3f}")


if __name__ == "__main__":
    main()
