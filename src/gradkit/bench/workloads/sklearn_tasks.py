"""Supervised workloads on the datasets that ship with scikit-learn (offline).

Splits are fixed (``split_seed``, default 0): 60 % train, 20 % validation, 20 % test.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gradkit.bench.workloads.base import (
    Arrays,
    ArrayWorkload,
    cross_entropy_and_accuracy,
    split_indices,
    standardize,
)
from gradkit.errors import require_extra


def _split(x: Tensor, y: Tensor, split_seed: int, scale: bool) -> Arrays:
    train, val, test = split_indices(len(x), (0.2, 0.2), split_seed)
    xs = (x[train], x[val], x[test])
    if scale:
        xs = standardize(*xs)
    return Arrays(xs[0], y[train], xs[1], y[val], xs[2], y[test])


def _load(loader_name: str) -> tuple[Tensor, Tensor]:
    datasets = require_extra("sklearn.datasets", "bench", "built-in benchmark workloads")
    data = getattr(datasets, loader_name)()
    return torch.as_tensor(data.data, dtype=torch.float32), torch.as_tensor(data.target)


class _SklearnWorkload(ArrayWorkload):
    """Keyword arguments override the class-level budget, target and size attributes."""

    split_seed = 0

    def __init__(self, **overrides: object):
        for key, value in overrides.items():
            if key.startswith("_") or not hasattr(self, key) or callable(getattr(self, key)):
                raise TypeError(f"{type(self).__name__} has no setting {key!r}")
            setattr(self, key, value)


class LogisticRegression(_SklearnWorkload):
    """Logistic regression on the breast-cancer data (569 × 30, standardised features)."""

    name = "logreg"
    metric = "accuracy"
    higher_is_better = True
    steps, batch_size, eval_every, target = 150, 32, 5, 0.97
    description = "logistic regression, sklearn breast cancer (569 x 30)"

    def arrays(self) -> Arrays:
        x, y = _load("load_breast_cancer")
        return _split(x, y.float(), self.split_seed, scale=True)

    def build_model(self) -> nn.Module:
        return nn.Linear(30, 1)

    def loss_and_metric(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        logits = output.squeeze(-1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target)
        accuracy = ((logits > 0).float() == target).float().mean()
        return loss, accuracy


class _DigitsWorkload(_SklearnWorkload):
    metric = "accuracy"
    higher_is_better = True
    steps, batch_size, eval_every, target = 200, 64, 10, 0.95

    def arrays(self) -> Arrays:
        x, y = _load("load_digits")
        return _split(x / 16.0, y.long(), self.split_seed, scale=False)

    def loss_and_metric(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        return cross_entropy_and_accuracy(output, target)


class DigitsMLP(_DigitsWorkload):
    """Two-hidden-layer ReLU MLP on the 8×8 digits (1797 images, 10 classes)."""

    name = "mlp"
    hidden = 64

    @property
    def description(self) -> str:  # type: ignore[override]
        return f"MLP 64-{self.hidden}-{self.hidden}-10, sklearn digits (1797 x 64)"

    def build_model(self) -> nn.Module:
        h = self.hidden
        return nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                             nn.Linear(h, 10))


class _Image(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.view(-1, 1, 8, 8)


class DigitsCNN(_DigitsWorkload):
    """Small CNN on the 8×8 digits: conv(c)-conv(2c)-maxpool-linear."""

    name = "cnn"
    channels = 8

    @property
    def description(self) -> str:  # type: ignore[override]
        c = self.channels
        return f"CNN conv3x3({c})-conv3x3({2 * c})-maxpool-linear, sklearn digits 8x8"

    def build_model(self) -> nn.Module:
        c = self.channels
        return nn.Sequential(
            _Image(),
            nn.Conv2d(1, c, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(2 * c * 16, 10),
        )
