"""Input checks shared by the aggregators, pre-aggregators and attacks.

Every message names the rule and says what to do, e.g.
``Krum requires n > 2f (fewer than half of the workers Byzantine), got n=4, f=2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def check_count(rule: str, name: str, value: Any, minimum: int = 0) -> int:
    """A non-negative (or ``>= minimum``) Python int, e.g. ``f`` or ``T``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        bound = "a non-negative integer" if minimum == 0 else f"an integer >= {minimum}"
        raise ValueError(f"Invalid {name} value: {value!r} ({rule} needs {bound})")
    return value


def check_real(rule: str, name: str, value: Any, *, positive: bool = False,
               nonnegative: bool = False) -> float:
    """A finite real number (optionally > 0 or >= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name} value: {value!r} ({rule} needs a real number)")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"Invalid {name} value: {value} ({rule} needs a finite number)")
    if positive and value <= 0:
        raise ValueError(f"Invalid {name} value: {value} ({rule} needs a positive number)")
    if nonnegative and value < 0:
        raise ValueError(f"Invalid {name} value: {value} ({rule} needs a non-negative number)")
    return value


def as_matrix(rule: str, vectors: Any) -> Tensor:
    """The (n, d) floating-point tensor of worker vectors, one row per worker.

    Accepts a 2-D tensor, a list/tuple of 1-D tensors (stacked) or anything ``torch.as_tensor``
    takes (e.g. a NumPy array). The dtype and device are kept; integer input is refused.
    """
    if isinstance(vectors, (list, tuple)):
        if len(vectors) == 0:
            raise ValueError(f"{rule} got no worker vectors (an empty list); pass an (n, d) "
                             "tensor with one row per worker")
        if all(isinstance(v, Tensor) for v in vectors):
            shapes = {tuple(v.shape) for v in vectors}
            if len(shapes) != 1:
                raise ValueError(f"{rule} got worker vectors of different shapes {sorted(shapes)};"
                                 " flatten every worker's gradient to the same length d")
            vectors = torch.stack([v.reshape(-1) for v in vectors])
    X = vectors if isinstance(vectors, Tensor) else torch.as_tensor(vectors)
    if X.dim() != 2:
        raise ValueError(
            f"{rule} expects an (n, d) tensor with one row per worker, got shape "
            f"{tuple(X.shape)}; flatten each worker's vector and stack them with "
            "torch.stack([g.flatten() for g in grads])"
        )
    n, d = X.shape
    if n == 0 or d == 0:
        raise ValueError(f"{rule} got an empty ({n}, {d}) tensor; it needs at least one worker "
                         "and one coordinate")
    if not X.is_floating_point():
        raise ValueError(f"{rule} expects floating-point vectors, got dtype {X.dtype}; "
                         "convert with X.float() or X.double()")
    return X


def nonfinite_rows(X: Tensor) -> list[int]:
    """Indices of the rows holding NaN or ±inf (one cheap pass when every row is finite)."""
    row_sums = X.sum(dim=1)
    if bool(torch.isfinite(row_sums).all()):
        return []
    # A non-finite sum can also be an overflow of finite values: check element-wise.
    bad = ~torch.isfinite(X).all(dim=1)
    return bad.nonzero().flatten().tolist()


def check_finite(rule: str, X: Tensor) -> None:
    bad = nonfinite_rows(X)
    if bad:
        shown = bad if len(bad) <= 10 else [*bad[:10], "..."]
        raise ValueError(
            f"{rule}: worker(s) {shown} sent non-finite values (NaN or inf) (row index of X); "
            f"drop those rows first, or compose DropNonFinite() >> {rule}(...) to discard them"
        )


def check_weights(rule: str, weights: Any, n: int, like: Tensor) -> Tensor:
    """Non-negative finite weights of length n, normalised to sum 1, on X's device/dtype."""
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    if w.dim() != 1 or w.numel() != n:
        raise ValueError(f"{rule}: weights must be a 1-D tensor with one entry per worker "
                         f"(n={n}), got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"{rule}: weights must be finite and non-negative, got {w.tolist()}")
    total = w.sum()
    if not bool(total > 0):
        raise ValueError(f"{rule}: weights sum to 0; give at least one worker a positive weight")
    return w / total


def check_byzantine_bound(rule: str, n: int, f: int) -> None:
    """The usual bound n > 2f (a strict honest majority)."""
    if not n > 2 * f:
        raise ValueError(
            f"{rule} requires n > 2f (fewer than half of the workers Byzantine), got n={n}, "
            f"f={f}; lower f to at most {(n - 1) // 2} or add workers"
        )


def check_indices(rule: str, name: str, indices: Sequence[int], n: int) -> list[int]:
    out = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise ValueError(f"Invalid {name} value: {i!r} ({rule} needs worker indices in "
                             f"0..{n - 1})")
        out.append(i)
    if len(set(out)) != len(out):
        raise ValueError(f"Invalid {name} value: {list(indices)} ({rule}: repeated index)")
    return out
