"""Straggler models for simulating coded and robust distributed rounds (seeded, deterministic).

Two models are offered:

* :class:`ExponentialDelays`: the time worker ``i`` needs in round ``r`` is
  ``load · (shift + E_{r,i})`` with ``E_{r,i} ~ Exp(mean)`` i.i.d. (the shifted-exponential model
  of the gradient-coding literature). :func:`expected_order_statistic` gives the exact expected
  time of the ``k``-th fastest of ``n`` such workers, the theoretical figure a master that waits
  for the first ``k`` responses is compared with.
* :class:`BurstyStragglers`: random straggler patterns that obey the ``(B, W, λ)``-bursty model of
  Sequential Gradient Coding (Krishnan, Ebrahimi, Khisti, ICLR 2023): within any window of ``W``
  consecutive rounds at most ``λ`` distinct workers straggle, and each straggler's straggles in a
  window form a single burst of at most ``B`` consecutive rounds. :func:`bursty_admits` is the
  check itself, shared with the sequential codes of :mod:`gradkit.distributed.coding`.

:func:`stragglers_from_delays` turns delays into a straggler set the way the SGC authors'
simulation does: a worker straggles in a round when its delay exceeds ``(1 + mu)`` times the
fastest worker's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from gradkit._checks import check_positive_int

__all__ = [
    "BurstyStragglers",
    "ExponentialDelays",
    "bursty_admits",
    "check_bursty_parameters",
    "expected_order_statistic",
    "stragglers_from_delays",
]


def _check_non_negative_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Invalid {name} value: {value!r} (must be a non-negative integer)")


def _check_non_negative(name: str, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"Invalid {name} value: {value} (must be a finite number >= 0)")


def check_bursty_parameters(n: int, B: int, W: int, lam: int) -> None:
    """Validate a ``(B, W, λ)``-bursty model for ``n`` workers: ``1 <= B < W``, ``0 <= λ <= n``."""
    check_positive_int("n", n)
    check_positive_int("B", B)
    check_positive_int("W", W)
    if B >= W:
        raise ValueError(f"Invalid B value: {B} (a burst must fit in the window: B < W = {W})")
    _check_non_negative_int("lam", lam)
    if lam > n:
        raise ValueError(f"Invalid lam value: {lam} (at most n = {n} workers can straggle)")


class ExponentialDelays:
    r"""Shifted-exponential worker delays, i.i.d. over workers and rounds.

    .. math::
        \tau_{r,i} = \mathrm{load}\cdot(\mathrm{shift} + E_{r,i}), \qquad
        E_{r,i} \sim \mathrm{Exp}(\text{mean})

    Args:
        n: number of workers.
        mean: mean of the exponential part (default: 1.0).
        shift: deterministic part of every delay (default: 0.0).
        seed: seed of the private generator; the same seed gives the same delays.
    """

    def __init__(self, n: int, mean: float = 1.0, shift: float = 0.0, seed: int = 0) -> None:
        check_positive_int("n", n)
        if not (mean > 0 and math.isfinite(mean)):
            raise ValueError(f"Invalid mean value: {mean} (must be a positive number)")
        _check_non_negative("shift", shift)
        self.n, self.mean, self.shift, self.seed = n, float(mean), float(shift), seed

    def sample(self, rounds: int, load: float = 1.0) -> Tensor:
        """Delays of ``rounds`` rounds as a ``(rounds, n)`` float64 tensor, scaled by ``load``."""
        check_positive_int("rounds", rounds)
        _check_non_negative("load", load)
        gen = torch.Generator().manual_seed(self.seed)
        e = torch.empty(rounds, self.n, dtype=torch.float64).exponential_(1.0, generator=gen)
        return load * (self.shift + self.mean * e)

    def expected(self, k: int, load: float = 1.0) -> float:
        """Expected time until the ``k``-th fastest of the ``n`` workers has answered."""
        return load * expected_order_statistic(self.n, k, self.mean, self.shift)


def expected_order_statistic(n: int, k: int, mean: float = 1.0, shift: float = 0.0) -> float:
    r"""``E[τ_(k:n)]`` for ``n`` i.i.d. ``shift + Exp(mean)`` variables.

    By the memorylessness of the exponential (Rényi's representation),

    .. math:: E[\tau_{(k:n)}] = \mathrm{shift} + \mathrm{mean}\sum_{j=n-k+1}^{n} \frac{1}{j},

    so waiting for everybody costs ``mean · H_n`` and waiting for the first ``n − s`` costs
    ``mean · (H_n − H_s)``.
    """
    check_positive_int("n", n)
    check_positive_int("k", k)
    if k > n:
        raise ValueError(f"Invalid k value: {k} (at most n = {n})")
    return shift + mean * sum(1.0 / j for j in range(n - k + 1, n + 1))


def stragglers_from_delays(delays: Tensor, mu: float) -> Tensor:
    """Boolean mask of the workers whose delay exceeds ``(1 + mu)`` times the fastest one's.

    ``delays`` is ``(n,)`` for one round or ``(rounds, n)``; the mask has the same shape.
    """
    _check_non_negative("mu", mu)
    fastest = delays.min(dim=-1, keepdim=True).values
    return delays > fastest * (1.0 + mu)


def _as_mask(stragglers: Tensor | Sequence[int] | set[int], n: int) -> Tensor:
    if isinstance(stragglers, Tensor) and stragglers.dtype == torch.bool:
        if stragglers.shape != (n,):
            shape = tuple(stragglers.shape)
            raise ValueError(f"straggler mask must have shape ({n},), got {shape}")
        return stragglers
    mask = torch.zeros(n, dtype=torch.bool)
    for i in stragglers:
        if not 0 <= int(i) < n:
            raise ValueError(f"worker index {i} out of range for n = {n} workers")
        mask[int(i)] = True
    return mask


def bursty_admits(
    history: Tensor, current: Tensor | Sequence[int] | set[int], B: int, W: int, lam: int
) -> bool:
    """Whether straggling by ``current`` in the next round keeps the pattern ``(B, W, λ)``-bursty.

    ``history`` is a ``(r, n)`` boolean tensor of the stragglers of rounds ``0..r-1`` (only those
    the master did not wait for), ``current`` the stragglers of round ``r`` (mask or indices);
    only the last ``W − 1`` rows of ``history`` matter, so passing just those is the same.
    Both conditions are checked for the window ending at round ``r``, as in the SGC authors'
    simulation, with the window clipped at round 0 (their M-SGC file lets a negative start wrap
    around; that is not copied):

    1. spatial: at most ``λ`` distinct workers straggle in rounds ``r − W + 1 .. r``;
    2. temporal: a worker straggling in round ``r`` did not straggle in rounds
       ``r − W + 1 .. r − B`` (so its straggles in any window are one burst of length ``<= B``).
    """
    r, n = history.shape
    cur = _as_mask(current, n)
    lo = max(0, r + 1 - W)
    window = history[lo:r].any(dim=0) if r > lo else torch.zeros(n, dtype=torch.bool)
    if int((window | cur).sum()) > lam:
        return False
    hi = max(0, r + 1 - B)
    early = history[lo:hi].any(dim=0) if hi > lo else torch.zeros(n, dtype=torch.bool)
    return not bool((early & cur).any())


class BurstyStragglers:
    """Random straggler patterns obeying the ``(B, W, λ)``-bursty model, seeded.

    Round by round, workers are visited in a random order; a worker that straggled in the
    previous round keeps straggling with probability ``p_continue``, any other starts straggling
    with probability ``p``, and a proposal is kept only if :func:`bursty_admits` still holds with
    it. Every pattern returned therefore satisfies the model.

    Args:
        n: number of workers.
        B: maximum burst length.
        W: window length.
        lam: maximum number of distinct stragglers in any window of ``W`` rounds.
        p: probability that a worker starts straggling in a round (default: 0.3).
        p_continue: probability that a burst goes on one more round (default: 0.7).
        seed: seed of the private generator.
    """

    def __init__(
        self,
        n: int,
        B: int,
        W: int,
        lam: int,
        p: float = 0.3,
        p_continue: float = 0.7,
        seed: int = 0,
    ) -> None:
        check_bursty_parameters(n, B, W, lam)
        for name, value in (("p", p), ("p_continue", p_continue)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Invalid {name} value: {value} (must be in [0, 1])")
        self.n, self.B, self.W, self.lam = n, B, W, lam
        self.p, self.p_continue, self.seed = p, p_continue, seed

    def sample(self, rounds: int) -> Tensor:
        """A ``(rounds, n)`` boolean straggler pattern."""
        check_positive_int("rounds", rounds)
        gen = torch.Generator().manual_seed(self.seed)
        pattern = torch.zeros(rounds, self.n, dtype=torch.bool)
        for r in range(rounds):
            order = torch.randperm(self.n, generator=gen).tolist()
            draws = torch.rand(self.n, generator=gen, dtype=torch.float64).tolist()
            current = torch.zeros(self.n, dtype=torch.bool)
            for i in order:
                was = r > 0 and bool(pattern[r - 1, i])
                if draws[i] >= (self.p_continue if was else self.p):
                    continue
                current[i] = True
                if not bursty_admits(pattern[:r], current, self.B, self.W, self.lam):
                    current[i] = False
            pattern[r] = current
        return pattern
