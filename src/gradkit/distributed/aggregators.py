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

from typing import Any, ClassVar

import torch
from torch import Tensor

from gradkit.distributed import _validation as V

__all__ = [
    "Aggregator",
    "DropNonFinite",
    "Mean",
    "Pipeline",
    "PreAggregator",
]


class _Rule:
    """What aggregators and pre-aggregators share: name, validation, repr, state."""

    #: whether ``weights=`` is meaningful for this rule
    supports_weights: ClassVar[bool] = False
    #: whether rows with NaN/inf are accepted (only :class:`DropNonFinite`)
    allows_nonfinite: ClassVar[bool] = False

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
        if not self.allows_nonfinite:
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


# --------------------------------------------------------------------------- aggregators
class Mean(Aggregator):
    r"""The average :math:`\frac1n\sum_i x_i` (ByzFL's ``Average``), or
    :math:`\sum_i w_i x_i` with weights. Not robust: one Byzantine worker moves it anywhere.
    """

    supports_weights = True

    def aggregate(self, X: Tensor, weights: Tensor | None) -> Tensor:
        if weights is None:
            return X.mean(dim=0)
        return weights @ X


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
