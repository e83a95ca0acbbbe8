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

import functools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

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
        if not self.single and isinstance(data, Iterator):
            raise TypeError(
                f"data is a one-shot iterator ({type(data).__name__}): every curvature "
                "product iterates the data once, and a second pass over it would be empty. "
                "Pass a list of (inputs, targets) batches or a DataLoader instead."
            )
        self.num_examples = -1  # unknown during the first pass
        count, self.num_batches = 0, 0
        for i, (x, y) in enumerate(self):
            self.num_batches += 1
            for name, t in (("inputs", x), ("targets", y)):
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"batch {i} of data has NaN or infinite {name}")
            count += x.shape[0]
        if count == 0:
            raise ValueError("data contains no examples")
        self.num_examples = count

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

    def first_batch(self) -> Batch:
        """The first batch, converted (global RNG restored)."""
        with torch.random.fork_rng(devices=[]):
            for batch in self.converted():
                return batch
        raise RuntimeError(
            f"a pass over data gave no batches, the first pass gave {self.num_examples} "
            "examples: "
            "data must give the same batches on every pass (an exhausted iterator?)"
        )

    def __iter__(self) -> Iterator[Batch]:
        """One pass with the global RNG state restored afterwards; a pass that yields a
        different number of examples than the first raises (no silently partial sums)."""
        count = 0
        with torch.random.fork_rng(devices=[]):
            for x, y in self.converted():
                count += x.shape[0]
                yield x, y
        if self.num_examples >= 0 and count != self.num_examples:
            raise RuntimeError(
                f"a pass over data gave {count} examples, the first pass gave "
                f"{self.num_examples}: data must give the same batches on every pass (an "
                "exhausted iterator, or a loader with random sampling or drop_last?)"
            )


def require_scalar_loss(value: Tensor, owner: str) -> Tensor:
    """``value`` if it is a one-element tensor, else a ``ValueError`` saying what to do."""
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"{owner}: loss_fn(outputs, targets) must return a scalar (the batch loss, mean- "
            f"or sum-reduced over the examples), got {shape}. Use reduction='mean' (or "
            "'sum'), not 'none'."
        )
    return value


def resolve_reduction(loss_fn: Callable[..., Tensor], given: str | None, owner: str
                      ) -> Literal["mean", "sum"]:
    """The batch reduction of ``loss_fn``: ``given``, else its ``reduction`` attribute (a
    ``torch.nn`` loss) or keyword (``functools.partial``), else "mean" (module docstring of
    :mod:`gradkit.curvature.operators`)."""
    if isinstance(loss_fn, functools.partial):
        found = loss_fn.keywords.get("reduction")
    else:
        found = getattr(loss_fn, "reduction", None)
    if found is not None and found not in ("mean", "sum"):
        raise ValueError(
            f"{owner}: loss_fn has reduction={found!r}; curvature needs a scalar batch loss: "
            "use reduction='mean' or 'sum'"
        )
    if given is not None:
        if given not in ("mean", "sum"):
            raise ValueError(f"Invalid reduction: {given!r} (use 'mean' or 'sum')")
        if found is not None and found != given:
            raise ValueError(f"{owner}: reduction={given!r} contradicts loss_fn's own "
                             f"reduction={found!r}")
        return given  # type: ignore[return-value]
    return "mean" if found is None else found


def check_loss(source: BatchSource, forward: Callable[[Tensor], Tensor],
               loss_fn: Callable[[Tensor, Tensor], Tensor], owner: str,
               infer_reduction: bool) -> str | None:
    """Evaluate ``loss_fn`` on (the first 64 examples of) the first batch: it must be a finite
    scalar. With ``infer_reduction`` and more than one batch, also return "mean" or "sum" when
    the loss of those examples is the example-weighted mean or the sum of the losses of their
    two halves (None when neither or both, or when it cannot be told)."""
    x, y = source.first_batch()
    x, y = x[:_MODEL_CHECK_EXAMPLES], y[:_MODEL_CHECK_EXAMPLES]
    with torch.no_grad():
        out = forward(x)
        whole = require_scalar_loss(loss_fn(out, y), owner)
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"{owner}: the model's output on the first batch contains NaN or "
                             "infinite values (non-finite parameters or buffers?)")
        if not bool(torch.isfinite(whole).all()):
            raise ValueError(f"{owner}: the loss on the first batch is {float(whole)} with "
                             "finite model outputs (check the targets)")
        n = x.shape[0]
        batch_major = out.ndim > 0 and out.shape[0] == n
        if not infer_reduction or source.num_batches < 2 or n < 2 or not batch_major:
            return None
        h = n // 2
        a, b = loss_fn(out[:h], y[:h]), loss_fn(out[h:], y[h:])
    whole, a, b = float(whole), float(a), float(b)
    tol = 1e3 * torch.finfo(out.dtype).eps * (abs(a) + abs(b) + abs(whole))
    is_mean = math.isclose(whole, (h * a + (n - h) * b) / n, rel_tol=0, abs_tol=tol)
    is_sum = math.isclose(whole, a + b, rel_tol=0, abs_tol=tol)
    if is_mean == is_sum:
        return None
    return "mean" if is_mean else "sum"


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
        x, _ = source.first_batch()
        x = x[:_MODEL_CHECK_EXAMPLES]  # a random layer shows on a few examples as on all
        with torch.no_grad():
            out1, out2 = forward(x), forward(x)
        if not bool(torch.isfinite(out1).all()):
            raise ValueError(
                f"{owner}: the model's output on the first batch contains NaN or infinite "
                "values (non-finite parameters or buffers?)"
            )
        if not torch.allclose(out1, out2, rtol=1e-6, atol=1e-9 * float(out1.abs().max())):
            raise NondeterministicError(
                f"{prefix} (model output): two forward passes on the same batch gave different "
                "outputs (Dropout or another random layer in train mode?). Call model.eval() "
                "before building the operator."
            )
