"""Progressive batching with AdAdaGrad's norm test on sklearn's digits.

Compared with a plain training loop, two lines change:

    loader = DataLoader(train, batch_size=8, shuffle=True)                       # before
    loader = DataLoader(train, batch_sampler=batching.make_sampler(train, seed=0))  # after
    ...
    batching.step(x, y)   # added after optimizer.step()

plus the construction of ``batching = AdaptiveBatchSize(...)``. The batch size grows when the
norm test finds the mini-batch gradient too noisy, and SGD's lr follows the linear rule.

Run: .venv/bin/python examples/adaptive_batch_size.py [--epochs 10] [--eta 1.0]
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradkit.batching import AdaptiveBatchSize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--test", default="norm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x))
    train = TensorDataset(x[perm[:1500]], y[perm[:1500]])
    x_test, y_test = x[perm[1500:]], y[perm[1500:]]

    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    loss_fn = nn.functional.cross_entropy
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    batching = AdaptiveBatchSize(model, loss_fn, initial_batch_size=8, max_batch_size=512,
                                 test=args.test, eta=args.eta, optimizer=optimizer,
                                 lr_rule="linear")
    loader = DataLoader(train, batch_sampler=batching.make_sampler(train, seed=args.seed))

    print(f"{'epoch':>5} {'steps':>6} {'batch':>6} {'lr':>8} {'train loss':>10} {'test acc':>8}")
    steps = 0
    for epoch in range(args.epochs):
        total, count = 0.0, 0
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            batching.step(xb, yb)
            total += loss.item() * len(xb)
            count += len(xb)
            steps += 1
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        lr = optimizer.param_groups[0]["lr"]
        print(f"{epoch:>5} {steps:>6} {batching.batch_size:>6} {lr:>8.4f} {total / count:>10.4f}"
              f" {acc:>8.3f}")

    changes, last = [], None
    for step, decision in batching.history:
        if decision.next_batch_size != last:
            changes.append(f"step {step}: {decision.next_batch_size}")
            last = decision.next_batch_size
    print("batch-size trajectory:", ", ".join(changes))


if __name__ == "__main__":
    main()
