"""Data handling for dataset-level curvature operators: one batch or an iterable of batches.

A full-dataset product weights every batch by its number of examples, so loader batches of
32, 32 and 5 give exactly the curvature of the 69 concatenated examples. Iterating the data
twice must give the same batches; :func:`check_deterministic` refuses shuffled loaders,
random augmentation and random layers, naming the check that failed (the lesson of
curvlinops issue #75). Every pass over the data runs inside ``torch.random.fork_rng`` so that
curvature computations never consume the global RNG (a ``DataLoader`` draws a base seed from
it on every iteration, even with ``shuffle=False``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from gradkit.autodiff.per_example import train_mode_batchnorm
from gradkit.errors import GradkitError

Batch = tuple[Tensor, Tensor]
_MODEL_CHECK_EXAMPLES = 64  # examples of the first batch run twice by the model-output check


class NondeterministicError(GradkitError, RuntimeError):
    """Two passes over the data (or two forward passes of the model) disagreed."""


def is_single_batch(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
    )


def check_no_train_batchnorm(model: nn.Module) -> None:
    """Refuse BatchNorm in train mode: its output and buffers depend on the batch."""
    name = train_mode_batchnorm(model)
    if name is not None:
        raise RuntimeError(
            f"module '{name}' is a BatchNorm in train mode: its output mixes the examples of a "
            "batch and every forward pass would update its running statistics, so the "
            "train-mode curvature is not one fixed matrix. Call model.eval() to measure the "
            "eval-mode network (gradkit never switches modes for you), or use "
            "GroupNorm/LayerNorm."
        )


class BatchSource:
    """Re-iterable batches converted to a dtype/device, with the total example count."""

    def __init__(self, data: Any, dtype: torch.dtype, device: torch.device):
        self.single = is_single_batch(data)
        self.data = data
        self.dtype = dtype
        self.device = device
        if not self.single and not isinstance(data, Iterable):
            raise TypeError(
                "data must be an (inputs, targets) batch or an iterable of such batches, "
                f"got {type(data).__name__}"
            )
        self.num_examples = sum(x.shape[0] for x, _ in self)
        if self.num_examples == 0:
            raise ValueError("data contains no examples")

    def _convert(self, t: Tensor) -> Tensor:
        if t.is_floating_point():
            return t.to(device=self.device, dtype=self.dtype)
        return t.to(device=self.device)

    def raw(self) -> Iterator[Batch]:
        if self.single:
            yield self.data[0], self.data[1]
            return
        for batch in self.data:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError(
                    "every batch must be an (inputs, targets) pair, got "
                    f"{type(batch).__name__}"
                )
            yield batch[0], batch[1]

    def converted(self) -> Iterator[Batch]:
        """One pass, converted, consuming the global RNG as the data source does."""
        for x, y in self.raw():
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"inputs and targets disagree on the batch size: {x.shape[0]} vs "
                    f"{y.shape[0]}"
                )
            yield self._convert(x), self._convert(y)

    def __iter__(self) -> Iterator[Batch]:
        """One pass with the global RNG state restored afterwards."""
        with torch.random.fork_rng(devices=[]):
            yield from self.converted()


def _fingerprint(t: Tensor) -> Tensor:
    """One float64 number per example: a fixed (non-random) projection of its entries."""
    flat = t.reshape(t.shape[0], -1).to(torch.float64)
    w = torch.linspace(1.0, 2.0, flat.shape[1], dtype=torch.float64, device=flat.device)
    return torch.cat([flat @ w, (flat * flat) @ w.flip(0)])


def check_deterministic(
    source: BatchSource, forward: Callable[[Tensor], Tensor], owner: str
) -> None:
    """Raise :class:`NondeterministicError` naming the failed check and the fix."""
    prefix = f"{owner}: determinism check failed"
    # One outer fork: the RNG advances between the two passes (as it would between two
    # products if a loader shuffled or augmented), and is restored at the end.
    with torch.random.fork_rng(devices=[]):
        passes = []
        for _ in range(0 if source.single else 2):  # a single (inputs, targets) is fixed
            sizes, xs, ys = [], [], []
            for x, y in source.converted():
                sizes.append(x.shape[0])
                xs.append(_fingerprint(x))
                ys.append(_fingerprint(y))
            passes.append((sizes, xs, ys))
        (s1, x1, y1), (s2, x2, y2) = passes or [([], [], [])] * 2
        same = s1 == s2 and all(torch.equal(a, b) for a, b in zip(x1 + y1, x2 + y2))
        if not same:
            def multiset(xs: list[Tensor]) -> Tensor:
                return torch.sort(torch.cat(xs)).values

            reordered = sum(s1) == sum(s2) and all(
                torch.allclose(multiset(a), multiset(b), rtol=1e-12, atol=0.0)
                for a, b in ((x1, x2), (y1, y2))
            )
            if reordered:
                raise NondeterministicError(
                    f"{prefix} (data order): two passes over `data` gave the same examples in a "
                    "different order (a shuffled loader?). Use DataLoader(..., shuffle=False) "
                    "or a fixed list of batches."
                )
            raise NondeterministicError(
                f"{prefix} (data values): two passes over `data` gave different examples "
                "(random data augmentation or transforms?). Disable augmentation for the "
                "curvature measurement."
            )
        x, _ = next(source.converted())
        x = x[:_MODEL_CHECK_EXAMPLES]  # a random layer shows on a few examples as on all
        with torch.no_grad():
            out1, out2 = forward(x), forward(x)
        if not torch.allclose(out1, out2, rtol=1e-6, atol=1e-9 * float(out1.abs().max())):
            raise NondeterministicError(
                f"{prefix} (model output): two forward passes on the same batch gave different "
                "outputs (Dropout or another random layer in train mode?). Call model.eval() "
                "before building the operator."
            )
