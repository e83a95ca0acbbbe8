r"""Robust aggregation rules: from n worker vectors to one.

The interface
-------------
An :class:`Aggregator` is a callable object: the constructor takes the hyperparameters
(keyword ``f`` = the number of Byzantine workers tolerated, where the rule has one; ByzFL's
names otherwise), the call takes the worker vectors and returns one vector::

    agg = Krum(f=1)
    g = agg(X)                  # X: (n, d) tensor, one row per worker -> (d,) tensor
    g = Mean()(X, weights=w)    # weights: (n,) non-negative, normalised to sum 1

* ``X`` keeps its dtype and device (no silent cast to float32); a list of equally-shaped
  tensors or a NumPy array is accepted and stacked. Integer input, a non-2-D input or an
  empty one is refused with a message saying how to build the (n, d) matrix.
* A row with NaN or ±inf raises ``ValueError`` naming the worker (row index); compose
  ``DropNonFinite() >> rule`` to discard such rows instead (ByzFL's ``GeometricMedian``
  silently drops ±inf rows: ``DropNonFinite() >> GeometricMedian()`` is that behaviour).
* Bounds are checked at call time, when n is known, with the rule's own bound in the
  message (``Krum requires n > 2f ..., got n=4, f=2``).
* ``weights`` are accepted only by rules with a natural weighted form (``supports_weights``);
  the others refuse them instead of ignoring them.

A :class:`PreAggregator` maps (n, d) to (m, d) (NNM and clipping keep m = n, bucketing gives
m = ⌈n/s⌉). Compose with ``>>``, read left to right as the data flows::

    rule = NNM(f=1) >> Krum(f=1)            # an Aggregator
    rule = Bucketing(s=2) >> ARC(f=1) >> CoordinateMedian()

Rules with state between calls (:class:`CenteredClipping` keeps its previous output) have
``reset()``, ``state_dict()`` and ``load_state_dict()``; a pipeline forwards them.

This is the one aggregation interface of ``gradkit.distributed``: the in-process simulator,
the torch.distributed and Ray runtimes and the Flower strategy adapter all call it on the
stacked (n, d) matrix of flattened worker vectors.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor

from gradkit.distributed import _validation as V

__all__ = [
    "AGGREGATORS",
    "ARC",
    "MDA",
    "NNM",
    "PRE_AGGREGATORS",
    "Aggregator",
    "Bucketing",
    "CenteredClipping",
    "Clipping",
    "CoordinateMedian",
    "DropNonFinite",
    "FlagAggregator",
    "GeometricMedian",
    "Krum",
    "Mean",
    "MoNNA",
    "MultiKrum",
    "Pipeline",
    "PreAggregator",
    "TrimmedMean",
    "pairwise_sq_distances",
]


class _Rule:
    """What aggregators and pre-aggregators share: name, validation, repr, state."""

    #: whether ``weights=`` is meaningful for this rule
    supports_weights: ClassVar[bool] = False
    #: whether rows with NaN/inf are accepted (only :class:`DropNonFinite`)
    allows_nonfinite: ClassVar[bool] = False
    #: whether the rule detects non-finite rows from a quantity it computes anyway (row
    #: norms, distances, its output) instead of a separate pass over X (see _check_rows)
    checks_rows_itself: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return type(self).__name__

    def _params(self) -> dict[str, Any]:
        """The constructor arguments, for ``repr``; subclasses list theirs."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{self.name}({args})"

    def _validate(self, vectors: Any, weights: Any) -> tuple[Tensor, Tensor | None]:
        X = V.as_matrix(self.name, vectors)
        if not self.allows_nonfinite and not self.checks_rows_itself:
            V.check_finite(self.name, X)
        w = None
        if weights is not None:
            if not self.supports_weights:
                raise ValueError(
                    f"{self.name} does not take weights (the rule has no weighted form); call "
                    "it without weights=, or use Mean, GeometricMedian or CenteredClipping"
                )
            w = V.check_weights(self.name, weights, X.shape[0], X)
        return X, w

    def check_n(self, n: int) -> None:
        """Raise ``ValueError`` if the rule cannot run on n vectors (the rule's bound)."""

    def _check_rows(self, X: Tensor, values: Tensor) -> None:
        """For rules with ``checks_rows_itself``: ``values`` is non-finite whenever a row of X
        is (row norms, distances, sums over rows); only then is X scanned, to name the rows."""
        if not math.isfinite(float(values.sum())):  # a sum is cheaper than isfinite().all()
            V.check_finite(self.name, X)

    # state (only stateful rules override these)
    def reset(self) -> None:
        """Forget any state kept between calls."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state, got keys {sorted(state)}")


class Aggregator(_Rule):
    """Base class: ``agg(X, weights=None)`` maps an (n, d) tensor to a (d,) tensor.

    Subclasses implement :meth:`aggregate` on an already validated matrix and, if the rule
    has a bound on n, :meth:`check_n`.
    """

    def __call__(self, vectors: Any, weights: Any = None) -> Tensor:
        X, w = self._validate(vectors, weights)
        return self._run(X, w)

    def _run(self, X: Tensor, weights: Tensor | None) -> Tensor:
        self.check_n(X.shape[0])
        return self.aggregate(X, weights)

    def aggregate(self, X: Tensor, weights: Tensor | None) -> Tensor:
        """The rule on a validated (n, d) matrix; ``weights`` is None or sums to 1."""
        raise NotImplementedError


class PreAggregator(_Rule):
    """Base class: ``pre(X)`` maps an (n, d) tensor to an (m, d) tensor.

    ``pre >> other`` composes: the result is an :class:`Aggregator` when ``other`` is one,
    a :class:`PreAggregator` otherwise.
    """

    #: True when output row i still belongs to worker i (so worker weights stay meaningful)
    preserves_rows: ClassVar[bool] = False

    def __call__(self, vectors: Any) -> Tensor:
        X, _ = self._validate(vectors, None)
        return self._run(X)

    def _run(self, X: Tensor) -> Tensor:
        self.check_n(X.shape[0])
        return self.transform(X)

    def transform(self, X: Tensor) -> Tensor:
        """The map on a validated (n, d) matrix."""
        raise NotImplementedError

    def __rshift__(self, other: _Rule) -> _Rule:
        if isinstance(other, Pipeline):
            return Pipeline([self, *other.pre], other.final)
        if isinstance(other, Aggregator):
            return Pipeline([self], other)
        if isinstance(other, _PreChain):
            return _PreChain([self, *other.stages])
        if isinstance(other, PreAggregator):
            return _PreChain([self, other])
        return NotImplemented


class _PreChain(PreAggregator):
    """Pre-aggregators applied in order (built by ``pre1 >> pre2``)."""

    def __init__(self, stages: list[PreAggregator]):
        self.stages = list(stages)

    @property
    def preserves_rows(self) -> bool:  # type: ignore[override]
        return all(s.preserves_rows for s in self.stages)

    @property
    def allows_nonfinite(self) -> bool:  # type: ignore[override]
        return self.stages[0].allows_nonfinite

    @property
    def checks_rows_itself(self) -> bool:  # type: ignore[override]
        return self.stages[0].checks_rows_itself

    @property
    def name(self) -> str:
        return " >> ".join(repr(s) for s in self.stages)

    def __repr__(self) -> str:
        return self.name

    def _run(self, X: Tensor) -> Tensor:
        for stage in self.stages:
            X = stage._run(X)
        return X

    def reset(self) -> None:
        for s in self.stages:
            s.reset()

    def state_dict(self) -> dict[str, Any]:
        return {str(i): s.state_dict() for i, s in enumerate(self.stages)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, s in enumerate(self.stages):
            s.load_state_dict(state.get(str(i), {}))


class Pipeline(Aggregator):
    """Pre-aggregators followed by an aggregator (built by ``pre >> agg``).

    The input is validated once, by the first stage's rules. ``weights`` are passed to the
    final aggregator, which is allowed only when every pre-aggregator keeps one row per
    worker (NNM, Clipping, ARC) and the final rule takes weights.
    """

    def __init__(self, pre: list[PreAggregator], final: Aggregator):
        if not isinstance(final, Aggregator):
            raise TypeError(f"the last stage of a pipeline must be an Aggregator, got {final!r}")
        self.pre, self.final = list(pre), final

    @property
    def supports_weights(self) -> bool:  # type: ignore[override]
        return self.final.supports_weights and all(p.preserves_rows for p in self.pre)

    @property
    def allows_nonfinite(self) -> bool:  # type: ignore[override]
        return self.pre[0].allows_nonfinite if self.pre else self.final.allows_nonfinite

    @property
    def checks_rows_itself(self) -> bool:  # type: ignore[override]
        return (self.pre[0] if self.pre else self.final).checks_rows_itself

    @property
    def name(self) -> str:
        return " >> ".join(repr(s) for s in (*self.pre, self.final))

    def __repr__(self) -> str:
        return self.name

    def _run(self, X: Tensor, weights: Tensor | None) -> Tensor:
        for stage in self.pre:
            X = stage._run(X)
        return self.final._run(X, weights)

    def reset(self) -> None:
        for s in (*self.pre, self.final):
            s.reset()

    def state_dict(self) -> dict[str, Any]:
        return {str(i): s.state_dict() for i, s in enumerate((*self.pre, self.final))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, s in enumerate((*self.pre, self.final)):
            s.load_state_dict(state.get(str(i), {}))


# ------------------------------------------------------------------------------ distances
#: an expanded squared distance ‖a‖² + ‖b‖² − 2⟨a, b⟩ is trusted when it keeps at least this
#: fraction of ‖a‖² + ‖b‖² (at most 3 bits lost to cancellation); otherwise it is recomputed
_TRUSTED_FRACTION = 0.125


def pairwise_sq_distances(X: Tensor) -> Tensor:
    r"""The (n, n) squared Euclidean distances between the rows of X, from one matrix product.

    :math:`\|a - b\|^2 = \|a\|^2 + \|b\|^2 - 2\langle a, b\rangle`, clamped at 0, with an
    exact zero diagonal. The expansion loses digits when a distance is small next to the
    norms (rows sharing a large common component), so an entry is trusted only if it keeps at
    least 1/8 of ``‖a‖² + ‖b‖²`` (at most 3 bits lost). If some entry does not, the rows are
    centred on their mean (distances do not change under a translation; this costs one copy
    of X) and the product is redone; the entries still untrusted (e.g. honest rows far from a
    mean pulled away by an outlier) are recomputed from the differences. The common case
    costs one product and no copy.
    """
    D, suspect = _gram_distances(X)
    if suspect.any():
        D, suspect = _gram_distances(X - X.mean(dim=0))
        pairs = torch.triu(suspect, diagonal=1).nonzero()
        chunk = max(1, (1 << 24) // X.shape[1])  # about 16M differences at a time
        for start in range(0, len(pairs), chunk):
            i, j = pairs[start:start + chunk].unbind(1)
            exact = _row_sq_norms(X[i] - X[j])
            D[i, j] = exact
            D[j, i] = exact
    return D


def _gram_distances(X: Tensor) -> tuple[Tensor, Tensor]:
    """Squared distances by the Gram expansion, and the mask of untrustworthy entries."""
    G = X @ X.T
    sq = G.diagonal().clone()
    S = sq[:, None] + sq[None, :]
    D = (S - 2 * G).clamp_min_(0)
    D.fill_diagonal_(0)
    suspect = D < _TRUSTED_FRACTION * S
    suspect.fill_diagonal_(False)
    return D, suspect


#: column-wise order statistics use a sorting network up to this many rows (torch.sort)
_NETWORK_MAX_ROWS = 64
#: columns per block of the sorting network (the block's rows stay in cache)
_NETWORK_BLOCK = 1 << 15


@functools.lru_cache(maxsize=256)
def _sorting_network(n: int, needed: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort network on n wires, keeping only the comparators that
    the ``needed`` output positions depend on. Comparator (i, j), i < j, puts the smaller
    value at i."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    used, keep = set(needed), []
    for i, j in reversed(pairs):
        if i in used or j in used:
            keep.append((i, j))
            used.update((i, j))
    return tuple(reversed(keep))


def _order_statistics(X: Tensor, positions: range) -> Tensor:
    """Rows ``positions`` of X sorted along dim 0 (the k-th smallest value of each column).

    Up to 64 rows, a sorting network of elementwise min/max on whole rows, applied block by
    block of 32768 columns: torch's per-column sort and selection kernels pay a fixed cost
    per column, the network pays per row pair (about 10x faster for n = 10 and 3-4x for
    n = 50 at d = 1e5-1e6, measured by ``benchmarks/aggregators.py``). Above, ``torch.sort``.
    """
    n, d = X.shape
    if n > _NETWORK_MAX_ROWS:
        return X.sort(dim=0).values[positions.start:positions.stop]
    pairs = _sorting_network(n, tuple(positions))
    out = X.new_empty((len(positions), d))
    for start in range(0, d, _NETWORK_BLOCK):
        W = X[:, start:start + _NETWORK_BLOCK].clone()
        rows = W.unbind(0)
        low = torch.empty_like(rows[0])
        for i, j in pairs:
            torch.minimum(rows[i], rows[j], out=low)
            torch.maximum(rows[i], rows[j], out=rows[j])
            rows[i].copy_(low)
        out[:, start:start + _NETWORK_BLOCK] = W[positions.start:positions.stop]
    return out


def _row_sq_norms(X: Tensor) -> Tensor:
    """‖x_i‖² of every row (a norm reduction: no n×d temporary, unlike X.square())."""
    return torch.linalg.vector_norm(X, dim=1).square()


def _distances_to(X: Tensor, z: Tensor, sq: Tensor | None = None) -> Tensor:
    """‖x_i − z‖ for every row: ``‖x_i‖² − 2 X z + ‖z‖²`` (one matrix-vector product; ``sq``
    are the ‖x_i‖² if known), with the rows the expansion cannot be trusted on (see
    :func:`pairwise_sq_distances`) recomputed from the differences."""
    if sq is None:
        sq = _row_sq_norms(X)
    zz = z @ z
    S = sq + zz
    d2 = S - 2 * (X @ z)
    suspect = d2 < _TRUSTED_FRACTION * S
    n_suspect = int(suspect.sum())
    if 2 * n_suspect > X.shape[0]:
        d2 = _row_sq_norms(X - z)
    elif n_suspect:
        d2[suspect] = _row_sq_norms(X[suspect] - z)
    return d2.clamp_min_(0).sqrt_()


def _first_k(values: Tensor, k: int, dim: int = -1) -> Tensor:
    """Indices of the k smallest values, ties to the lower index (stable order)."""
    return torch.sort(values, dim=dim, stable=True).indices.narrow(dim, 0, k)


def _check_f(rule: _Rule, n: int) -> None:
    V.check_byzantine_bound(rule.name, n, rule.f)


# --------------------------------------------------------------------------- aggregators
class Mean(Aggregator):
    r"""The average :math:`\frac1n\sum_i x_i` (ByzFL's ``Average``), or
    :math:`\sum_i w_i x_i` with weights. Not robust: one Byzantine worker moves it anywhere.
    """

    supports_weights = True
    checks_rows_itself = True

    def aggregate(self, X: Tensor, weights: Tensor | None) -> Tensor:
        out = X.mean(dim=0) if weights is None else weights @ X
        self._check_rows(X, out)
        return out


class CoordinateMedian(Aggregator):
    r"""The coordinate-wise median (ByzFL's ``Median``). For an even n it is the average of
    the two middle values of each coordinate (NumPy's median and ``torch.quantile(0.5)``;
    ``torch.median`` would return the lower one). No bound on n; robust while f < n/2.
    """

    def aggregate(self, X: Tensor, weights: Tensor | None) -> Tensor:
        n = X.shape[0]
        if n % 2:
            return _order_statistics(X, range(n // 2, n // 2 + 1))[0]
        lower, upper = _order_statistics(X, range(n // 2 - 1, n // 2 + 1))
        return torch.lerp(lower, upper, 0.5)  # rounds as torch.quantile(X, 0.5) does


class TrimmedMean(Aggregator):
    r"""Per coordinate: drop the f smallest and the f largest values, average the n − 2f left
    (ByzFL's ``TrMean``; f = 0 is the mean). Requires n > 2f.

    Args:
        f: number of Byzantine workers to tolerate (values trimmed on each side).
    """

    def __init__(self, f: int = 0):
        self.f = V.check_count(self.name, "f", f)

    def _params(self):
        return {"f": self.f}

    def check_n(self, n: int) -> None:
        _check_f(self, n)

    def aggregate(self, X: Tensor, weights: Tensor | None) -> Tensor:
        n, f = X.shape[0], self.f
        if f == 0:
            return X.mean(dim=0)
        return _order_statistics(X, range(f, n - f)).mean(dim=0)


class GeometricMedian(Aggregator):
    r"""Smoothed Weiszfeld iterations towards the geometric median (ByzFL's parameters).

    .. math::
        z_0 = 0,\qquad
        \beta_i = \max(\nu, \|x_i - z_t\|),\qquad
        z_{t+1} = \frac{\sum_i w_i x_i / \beta_i}{\sum_i w_i / \beta_i}
        \quad (t = 0, \dots, T-1)

    with :math:`w_i = 1/n` (or the given weights). ``T = 3`` from :math:`z_0 = 0` is not
    converged (ByzFL's default, kept for parity); raise ``T`` or pass ``init`` for an
    accurate median. ByzFL drops rows containing ±inf; here such rows raise unless the rule
    is composed after ``DropNonFinite()``.

    Args:
        nu: smoothing floor ν > 0 of the distances (0.1).
        T: number of Weiszfeld iterations (3).
        init: the starting point :math:`z_0` (a (d,) tensor; default zeros, as ByzFL).
    """

    supports_weights = True
    checks_rows_itself = True

    def __init__(self, nu: float = 0.1, T: int = 3, init: Tensor | None = None):
        self.nu = V.check_real(self.name, "nu", nu, positive=True)
        self.T = V.check_count(self.name, "T", T)
        self.init = init

    def _params(self):
        return {"nu": self.nu, "T": self.T}

    def aggregate(self, X: Tensor, weights: Tensor | None) -> Tensor:
        n, d = X.shape
        w = weights if weights is not None else X.new_full((n,), 1.0 / n)
        sq = _row_sq_norms(X)  # ‖x_i‖², reused by every iteration
        self._check_rows(X, sq)
        if self.init is None:
            z = X.new_zeros(d)
            dist = sq.sqrt()  # the distances to z_0 = 0
        else:
            z = torch.as_tensor(self.init, dtype=X.dtype, device=X.device)
            if z.shape != (d,):
                raise ValueError(f"GeometricMedian: init has shape {tuple(z.shape)}, the "
                                 f"vectors have d={d}; pass a ({d},) tensor")
            dist = None
        for _ in range(self.T):
            if dist is None:
                dist = _distances_to(X, z, sq)
            alpha = w / dist.clamp_min(self.nu)
            z = (alpha @ X) / alpha.sum()
            dist = None
        return z


class Krum(Aggregator):
    r"""Krum (Blanchard et al., NeurIPS 2017): the vector with the lowest score

    .. math:: s_i = \frac1k \sum_{j \in N_k(i)} \|x_i - x_j\|^2

    over its k nearest other vectors :math:`N_k(i)`; ties go to the lowest index. ByzFL's
    k = n − f − 1 with a mean is the default (its tests depend on it); Blanchard et al. and
    Flower use k = n − f − 2 with a sum (``neighbors=n - f - 2``; the sum and the mean pick
    the same vector). Requires n > 2f (ByzFL's check; the paper's guarantee needs n > 2f + 2).

    Args:
        f: number of Byzantine workers to tolerate.
        neighbors: k (default n − f − 1), between 1 and n − 1.
    """

    checks_rows_itself = True

    def __init__(self, f: int = 0, neighbors: int | None = None):
        self.f = V.check_count(self.name, "f", f)
        self.neighbors = None if neighbors is None else V.check_count(
            self.name, "neighbors", neighbors, minimum=1)

    def _params(self):
        out: dict[str, Any] = {"f": self.f}
        if self.neighbors is not None:
            out["neighbors"] = self.neighbors
        return out

    def check_n(self, n: int) -> None:
        _check_f(self, n)
        if self.neighbors is not None and self.neighbors > n - 1:
            raise ValueError(f"{self.name}: neighbors={self.neighbors} needs n > neighbors, "
                             f"got n={n}; lower neighbors to at most {n - 1}")

    def scores(self, X: Tensor) -> Tensor:
        """The (n,) Krum scores (mean squared distance to the k nearest other vectors)."""
        n = X.shape[0]
        k = self.neighbors if self.neighbors is not None else n - self.f - 1
        if k == 0:  # n = 1, f = 0: nothing to compare
            V.check_finite(self.name, X)
            return X.new_zeros(n)
        D = pairwise_sq_distances(X)
        self._check_rows(X, D)
        D.fill_diagonal_(math.inf)
        return torch.topk(D, k, dim=1, largest=False).values.mean(dim=1)

    def aggregate(self, X: Tensor, weights: Tensor | None) -> Tensor:
        return X[int(torch.argmin(self.scores(X)))].clone()


class MultiKrum(Krum):
    r"""Multi-Krum: the average of the m vectors with the lowest Krum scores (see
    :class:`Krum`); ByzFL's m = n − f is the default, ties go to the lower index.

    Args:
        f: number of Byzantine workers to tolerate.
        m: number of vectors averaged (default n − f).
        neighbors: Krum's k (default n − f − 1).
    """

    def __init__(self, f: int = 0, m: int | None = None, neighbors: int | None = None):
        super().__init__(f=f, neighbors=neighbors)
        self.m = None if m is None else V.check_count(self.name, "m", m, minimum=1)

    def _params(self):
        out = super()._params()
        if self.m is not None:
            out["m"] = self.m
        return out

    def check_n(self, n: int) -> None:
        super().check_n(n)
        if self.m is not None and self.m > n:
            raise ValueError(f"MultiKrum: m={self.m} vectors cannot be selected from n={n}; "
                             f"lower m to at most {n}")

    def aggregate(self, X: Tensor, weights: Tensor | None) -> Tensor:
        m = self.m if self.m is not None else X.shape[0] - self.f
        return X[_first_k(self.scores(X), m)].mean(dim=0)


class CenteredClipping(Aggregator):
    r"""Centered clipping (Karimireddy, He, Jaggi, ICML 2021), ByzFL's parameterisation:

    .. math::
        v_0 = m,\qquad v_{l+1} = v_l + \sum_i w_i\, \mathrm{clip}_\tau(x_i - v_l)
        \quad (l = 0, \dots, L-1),\qquad
        \mathrm{clip}_\tau(u) = u \min(1, \tau/\|u\|)

    with :math:`w_i = 1/n` or the given weights. The output is kept as the next call's
    :math:`v_0` (the previous aggregate, as ByzFL does); ``reset()`` forgets it (back to
    ``m``, or zeros), ``state_dict()``/``load_state_dict()`` save and restore it. ByzFL's
    constructor refuses every ``m`` (a type-check bug); here ``m`` is a (d,) tensor.

    Args:
        m: the first centre (default zeros).
        L: number of clipping iterations (1).
        tau: clipping radius τ ≥ 0 (100.0).
    """

    supports_weights = True
    checks_rows_itself = True

    def __init__(self, m: Tensor | None = None, L: int = 1, tau: float = 100.0):
        self.m = None if m is None else torch.as_tensor(m)
        if self.m is not None and self.m.dim() != 1:
            raise ValueError(f"CenteredClipping: m must be a 1-D (d,) tensor, got shape "
                             f"{tuple(self.m.shape)}")
        self.L = V.check_count(self.name, "L", L)
        self.tau = V.check_real(self.name, "tau", tau, nonnegative=True)
        self.center: Tensor | None = None

    def _params(self):
        return {"L": self.L, "tau": self.tau}

    def reset(self) -> None:
        self.center = None

    def state_dict(self) -> dict[str, Any]:
        return {"center": None if self.center is None else self.center.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        center = state.get("center")
        self.center = None if center is None else torch.as_tensor(center).clone()

    def aggregate(self, X: Tensor, weights: Tensor | None) -> Tensor:
        n, d = X.shape
        v = self.center if self.center is not None else self.m
        v = X.new_zeros(d) if v is None else v.to(dtype=X.dtype, device=X.device)
        if v.shape != (d,):
            raise ValueError(f"CenteredClipping: the centre has shape {tuple(v.shape)}, the "
                             f"vectors have d={d}; call reset() or pass m of shape ({d},)")
        w = weights if weights is not None else X.new_full((n,), 1.0 / n)
        sq = _row_sq_norms(X)  # ‖x_i‖², reused by every iteration
        self._check_rows(X, sq)
        for _ in range(self.L):
            dist = _distances_to(X, v, sq)
            scale = torch.where(dist > self.tau, self.tau / dist, torch.ones_like(dist))
            c = w * scale  # v + Σ c_i (x_i − v)
            v = v + (c @ X - c.sum() * v)
        self.center = v.detach().clone()
        return v


class MDA(Aggregator):
    r"""Minimum-diameter averaging (El Mhamdi et al., 2018): among all subsets S of n − f
    vectors, the one with the smallest diameter :math:`\max_{i,j\in S}\|x_i - x_j\|`
    (the first in lexicographic order on ties), averaged. Enumerates C(n, f) subsets, so it
    refuses more than ``max_subsets``. Requires n > 2f.

    Args:
        f: number of Byzantine workers to tolerate.
        max_subsets: the largest C(n, f) accepted (100 000).
    """

    checks_rows_itself = True

    def __init__(self, f: int = 0, max_subsets: int = 100_000):
        self.f = V.check_count(self.name, "f", f)
        self.max_subsets = V.check_count(self.name, "max_subsets", max_subsets, minimum=1)

    def _params(self):
        return {"f": self.f}

    def check_n(self, n: int) -> None:
        _check_f(self, n)
        if math.comb(n, self.f) > self.max_subsets:
            raise ValueError(
                f"MDA: n={n}, f={self.f} has C(n, f)={math.comb(n, self.f)} subsets, more than "
                f"max_subsets={self.max_subsets}; raise max_subsets or use MultiKrum/NNM"
            )

    def aggregate(self, X: Tensor, weights: Tensor | None) -> Tensor:
        n = X.shape[0]
        k = n - self.f
        if self.f == 0:
            mean = X.mean(dim=0)
            self._check_rows(X, mean)
            return mean
        D = pairwise_sq_distances(X)  # squared: the same order as the distances
        self._check_rows(X, D)
        subsets = torch.tensor(list(itertools.combinations(range(n), k)), device=X.device)
        chunk = max(1, (1 << 22) // (k * k))
        diameters = torch.cat([
            D[s[:, :, None], s[:, None, :]].amax(dim=(1, 2))
            for s in subsets.split(chunk)
        ])
        return X[subsets[int(torch.argmin(diameters))]].mean(dim=0)


class MoNNA(Aggregator):
    r"""Nearest-neighbour averaging around one vector (Farhadkhani et al., ICML 2023): the
    average of the n − f vectors nearest to :math:`x_{idx}` (itself included; ties to the
    lower index). In MoNNA each honest node applies it with its own model as ``idx``.
    Requires n > 2f and idx < n.

    Args:
        f: number of Byzantine workers to tolerate.
        idx: the index of the reference vector (0).
    """

    checks_rows_itself = True

    def __init__(self, f: int = 0, idx: int = 0):
        self.f = V.check_count(self.name, "f", f)
        self.idx = V.check_count(self.name, "idx", idx)

    def _params(self):
        return {"f": self.f, "idx": self.idx}

    def check_n(self, n: int) -> None:
        _check_f(self, n)
        if not self.idx < n:
            raise ValueError(f"MoNNA: idx={self.idx} must be a worker index, got n={n}; "
                             f"use an idx below {n}")

    def aggregate(self, X: Tensor, weights: Tensor | None) -> Tensor:
        dist = _distances_to(X, X[self.idx])
        self._check_rows(X, dist)
        dist[self.idx] = 0  # exactly (cdist of a row with itself may round)
        return X[_first_k(dist, X.shape[0] - self.f)].mean(dim=0)


class FlagAggregator(Aggregator):
    r"""Flag Aggregator (Almasi, Mishra, Vamanan, Ravi, ICLR 2024), as the authors' code does.

    With unit vectors :math:`x_i = g_i / \max(\|g_i\|, 10^{-12})`, find an orthonormal
    :math:`Y \in \mathbb R^{d\times r}` that approximately minimises

    .. math::
        J(Y) = \sum_i \sqrt{|1 - \|Y^\top x_i\|^2|}
             + \frac{\lambda}{p(p-1)} \sum_{i \ne j} \sqrt{|1 - \|Y^\top (x_i - x_j)\|^2|}

    by IRLS from :math:`Y_0`: weights :math:`w_i = (|1 - \|Y^\top x_i\|^2| + \epsilon)^{-1/4}`
    (and :math:`w_{ij} = \frac{\lambda}{p(p-1)}(|1 - \|Y^\top(x_i-x_j)\|^2| + \epsilon)^{-1/4}`
    for λ > 0), ε = 1e-7, then Y ← the r leading left singular vectors of the matrix with
    columns :math:`w_i x_i` (and :math:`w_{ij}(x_i - x_j)`). Stop after ``n_its`` iterations,
    when J decreases by at most 1e-10 or J ≤ 1e-10; an iteration that does not decrease J
    is undone. Output :math:`\frac1r \sum_i Y Y^\top x_i`.

    Computation: everything after the (p, p) Gram matrix of the unit vectors is p-dimensional
    (Y stays in their span, the weighted SVD is an eigenproblem of a p×p matrix, and λ > 0
    folds the p² pairwise columns into a p×p Cholesky factor instead of the reference's
    d×p² matrix), so the cost is one O(d·p²) product plus O(d·p·r). The result equals the
    reference's; it writes no files and runs on any device.

    Choices: the output's norm is at most p/r whatever the gradients' norms (the reference's
    scale); ``rescale="mean_norm"`` multiplies it by the mean ‖g_i‖. With r > p the sum is
    still divided by r (with a warning), as the reference. ``f`` is accepted for interface
    uniformity and unused, as in the reference. :math:`Y_0` is the Q factor of a
    uniform(−0.5, 0.5) d×r matrix from a ``torch.Generator`` seeded with ``init`` (default
    1; not the reference's bits), or ``init`` itself when it is a (d, r) tensor.

    Args:
        r: subspace dimension (1; the authors use about p/2).
        lambda_: weight λ ≥ 0 of the pairwise terms (0).
        n_its: maximum IRLS iterations (1, as the "flag" rule of the experiments; their
            "flag_median" uses 4).
        init: seed (int) or a (d, r) starting matrix.
        rescale: None or ``"mean_norm"``.
        f: unused.
    """

    _EPS = 1e-7
    _TOL = 1e-10
    checks_rows_itself = True

    def __init__(self, r: int = 1, lambda_: float = 0.0, n_its: int = 1,
                 init: int | Tensor = 1, rescale: str | None = None, f: int | None = None):
        self.r = V.check_count(self.name, "r", r, minimum=1)
        self.lambda_ = V.check_real(self.name, "lambda_", lambda_, nonnegative=True)
        self.n_its = V.check_count(self.name, "n_its", n_its)
        if not isinstance(init, Tensor):
            V.check_count(self.name, "init", init)
        self.init = init
        if rescale not in (None, "mean_norm"):
            raise ValueError(f"Invalid rescale value: {rescale!r} (None or 'mean_norm')")
        self.rescale = rescale
        self.f = None if f is None else V.check_count(self.name, "f", f)

    def _params(self):
        return {"r": self.r, "lambda_": self.lambda_, "n_its": self.n_its}

    def _start(self, d: int, like: Tensor) -> Tensor:
        if isinstance(self.init, Tensor):
            Y0 = self.init.to(dtype=like.dtype, device=like.device)
            if Y0.shape != (d, self.r):
                raise ValueError(f"FlagAggregator: init has shape {tuple(Y0.shape)}, expected "
                                 f"(d, r) = ({d}, {self.r})")
            return Y0
        g = torch.Generator().manual_seed(self.init)
        A = torch.rand(d, self.r, generator=g, dtype=like.dtype) - 0.5
        return torch.linalg.qr(A).Q.to(like.device)

    def _objective(self, P: Tensor) -> Tensor:
        """J from P = (Yᵀ x_i)_i, a (p, r) matrix."""
        J = (1 - P.square().sum(dim=1)).abs().sqrt().sum()
        if self.lambda_ > 0:
            p = P.shape[0]
            pair = (1 - torch.cdist(P, P).square()).abs().sqrt()
            J = J + self.lambda_ / (p * (p - 1)) * (pair.sum() - pair.diagonal().sum())
        return J

    def _scatter_factor(self, P: Tensor) -> Tensor:
        """B with B Bᵀ = Σ w_i² e_i e_iᵀ + Σ_{i≠j} w_ij² (e_i − e_j)(e_i − e_j)ᵀ."""
        w2 = ((1 - P.square().sum(dim=1)).abs() + self._EPS).rsqrt()  # w_i²
        if self.lambda_ == 0:
            return torch.diag(w2.sqrt())
        p = P.shape[0]
        c = self.lambda_ / (p * (p - 1))
        W2 = c * c * ((1 - torch.cdist(P, P).square()).abs() + self._EPS).rsqrt()
        W2.fill_diagonal_(0)
        C = torch.diag(w2) + 2 * (torch.diag(W2.sum(dim=1)) - W2)
        return torch.linalg.cholesky(C)

    def check_n(self, n: int) -> None:
        if self.r > n and self.lambda_ == 0:
            warnings.warn(f"FlagAggregator: r={self.r} > p={n}: the subspace has at most {n} "
                          f"directions but the sum is still divided by r (as the reference)",
                          stacklevel=4)
        if self.lambda_ > 0 and n < 2:
            raise ValueError("FlagAggregator: lambda_ > 0 needs at least 2 workers")

    def aggregate(self, X: Tensor, weights: Tensor | None) -> Tensor:
        d = X.shape[1]
        if self.r > d:
            raise ValueError(f"FlagAggregator: r={self.r} exceeds the dimension d={d}")
        norms = torch.linalg.vector_norm(X, dim=1)
        self._check_rows(X, norms)
        U = X / norms.clamp_min(1e-12)[:, None]  # rows = unit vectors x_i
        K = (U @ U.T).double()  # all that the iterations need
        Y0 = self._start(d, X)
        P = (U @ Y0).double()  # (p, r): Yᵀ x_i
        A = None  # Y = Uᵀ A once an iteration has been accepted
        J = self._objective(P)
        for _ in range(self.n_its):
            if J <= self._TOL:
                break
            B = self._scatter_factor(P)
            evals, evecs = torch.linalg.eigh(B.T @ K @ B)  # ascending
            keep = evals.flip(0)[: self.r]
            top = evecs.flip(1)[:, : self.r]
            ok = keep > keep[0] * 1e-12 if len(keep) and keep[0] > 0 else keep > 0
            A_new = (B @ top[:, ok]) / keep[ok].sqrt()
            P_new = K @ A_new
            J_new = self._objective(P_new)
            if not J_new < J:
                break
            decrease = J - J_new
            A, P, J = A_new, P_new, J_new
            if decrease <= self._TOL:
                break
        coeff = P.sum(dim=0)  # Yᵀ Σ_i x_i
        if A is None:
            out = Y0 @ coeff.to(X.dtype)
        else:
            out = (A @ coeff).to(X.dtype) @ U
        out = out / self.r
        if self.rescale == "mean_norm":
            out = out * norms.mean()
        return out


# ----------------------------------------------------------------------- pre-aggregators
class DropNonFinite(PreAggregator):
    """Discard the rows holding NaN or ±inf (m ≤ n rows out); refuse if none is left.

    Put it first in a pipeline to tolerate workers that send non-finite vectors (the
    ``Inf`` attack): ``DropNonFinite() >> GeometricMedian()`` reproduces ByzFL's geometric
    median, which skips rows containing ±inf. The later stages' bounds are checked against
    the number of rows left.
    """

    allows_nonfinite = True

    def transform(self, X: Tensor) -> Tensor:
        bad = V.nonfinite_rows(X)
        if not bad:
            return X
        if len(bad) == X.shape[0]:
            raise ValueError("DropNonFinite: every worker sent non-finite values (NaN or inf); "
                             "nothing is left to aggregate")
        keep = torch.ones(X.shape[0], dtype=torch.bool, device=X.device)
        keep[bad] = False
        return X[keep]


class NNM(PreAggregator):
    r"""Nearest-neighbour mixing (Allouah et al., AISTATS 2023): row i ← the average of the
    n − f rows nearest to :math:`x_i` (itself included; ties to the lower index). Computed as
    one (n, n) selection matrix times X. Requires f < n (ByzFL's check).

    Args:
        f: number of Byzantine workers to tolerate.
    """

    preserves_rows = True
    checks_rows_itself = True

    def __init__(self, f: int = 0):
        self.f = V.check_count(self.name, "f", f)

    def _params(self):
        return {"f": self.f}

    def check_n(self, n: int) -> None:
        if not self.f < n:
            raise ValueError(f"NNM requires n > f (at least one vector to average), got "
                             f"n={n}, f={self.f}; lower f to at most {n - 1}")

    def transform(self, X: Tensor) -> Tensor:
        n = X.shape[0]
        k = n - self.f
        if self.f == 0:
            mean = X.mean(dim=0)
            self._check_rows(X, mean)
            return mean.expand(n, -1).clone()
        D = pairwise_sq_distances(X)
        self._check_rows(X, D)
        nearest = _first_k(D, k, dim=1)
        S = X.new_zeros(n, n).scatter_(1, nearest, 1.0 / k)
        return S @ X


class Bucketing(PreAggregator):
    r"""Bucketing (Karimireddy, He, Jaggi, ICLR 2022): shuffle the rows, average consecutive
    buckets of s rows; a last partial bucket is averaged too (⌈n/s⌉ rows out). ``s = 1`` is
    a pure shuffle.

    Args:
        s: bucket size (1).
        generator: the ``torch.Generator`` of the shuffle (default: torch's global one, as
            ByzFL, so ``torch.manual_seed`` reproduces its permutation).
    """

    checks_rows_itself = True

    def __init__(self, s: int = 1, generator: torch.Generator | None = None):
        self.s = V.check_count(self.name, "s", s, minimum=1)
        self.generator = generator

    def _params(self):
        return {"s": self.s}

    def transform(self, X: Tensor) -> Tensor:
        n, d = X.shape
        perm = torch.randperm(n, generator=self.generator)
        X = X[perm.to(X.device)]
        full = (n // self.s) * self.s
        out = X[:full].reshape(n // self.s, self.s, d).mean(dim=1)
        if full < n:
            out = torch.cat([out, X[full:].mean(dim=0, keepdim=True)])
        self._check_rows(X, out)  # a bucket mean is non-finite if one of its rows is
        return out


def _clip_rows(X: Tensor, norms: Tensor, threshold: Tensor | float) -> Tensor:
    scale = torch.where(norms > threshold, threshold / norms, torch.ones_like(norms))
    return X * scale[:, None]


class Clipping(PreAggregator):
    r"""Static clipping: :math:`x_i \leftarrow x_i \min(1, c/\|x_i\|)` (returns a new tensor;
    ByzFL modifies its input in place).

    Args:
        c: the clipping threshold c ≥ 0 (2.0).
    """

    preserves_rows = True

    checks_rows_itself = True

    def __init__(self, c: float = 2.0):
        self.c = V.check_real(self.name, "c", c, nonnegative=True)

    def _params(self):
        return {"c": self.c}

    def transform(self, X: Tensor) -> Tensor:
        norms = torch.linalg.vector_norm(X, dim=1)
        self._check_rows(X, norms)
        return _clip_rows(X, norms, self.c)


class ARC(PreAggregator):
    r"""Adaptive robust clipping (Allouah et al., 2024): the
    :math:`k = \lfloor 2f(n - f)/n \rfloor` rows of largest norm are clipped to the norm of
    the (n − k)-th smallest (ties in norm: the higher index counts as larger). Requires
    f ≤ n.

    k is computed in integer arithmetic; ByzFL computes ``int((2f/n)(n−f))`` in floating
    point, which rounds down one too far when the exact product is an integer that the
    floats miss (n = 121, f = 66: ByzFL 59, here 60; the two agree for every n < 121).

    Args:
        f: number of Byzantine workers to tolerate.
    """

    preserves_rows = True

    checks_rows_itself = True

    def __init__(self, f: int = 0):
        self.f = V.check_count(self.name, "f", f)

    def _params(self):
        return {"f": self.f}

    def check_n(self, n: int) -> None:
        if not self.f <= n:
            raise ValueError(f"ARC requires f <= n, got n={n}, f={self.f}")

    def transform(self, X: Tensor) -> Tensor:
        n = X.shape[0]
        k = 2 * self.f * (n - self.f) // n
        norms = torch.linalg.vector_norm(X, dim=1)
        self._check_rows(X, norms)
        if k == 0:
            return X.clone()
        order = torch.sort(norms, stable=True).indices
        threshold = norms[order[n - k - 1]]
        clipped = torch.zeros(n, dtype=torch.bool, device=X.device)
        clipped[order[n - k:]] = True
        return _clip_rows(X, torch.where(clipped, norms, torch.zeros_like(norms)), threshold)


#: the rules by short name (for grids and command lines); each takes keyword arguments
AGGREGATORS: dict[str, type[Aggregator]] = {
    "mean": Mean,
    "median": CoordinateMedian,
    "trimmed_mean": TrimmedMean,
    "geometric_median": GeometricMedian,
    "krum": Krum,
    "multi_krum": MultiKrum,
    "centered_clipping": CenteredClipping,
    "mda": MDA,
    "monna": MoNNA,
    "flag": FlagAggregator,
}
PRE_AGGREGATORS: dict[str, type[PreAggregator]] = {
    "nnm": NNM,
    "bucketing": Bucketing,
    "clipping": Clipping,
    "arc": ARC,
    "drop_non_finite": DropNonFinite,
}
