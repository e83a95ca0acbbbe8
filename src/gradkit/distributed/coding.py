r"""Gradient coding: exact full gradients from the first ``n − s`` of ``n`` workers.

**Gradient coding** (R. Tandon, Q. Lei, A. G. Dimakis, N. Karampatziakis, "Gradient Coding:
Avoiding Stragglers in Distributed Learning", ICML 2017). The data of one step is cut into
``k`` partitions with partial gradients ``h_1..h_k``; worker ``i`` sends

.. math:: f_i = \sum_j B_{ij} h_j ,

and for any set ``I`` of at least ``n − s`` responders there is a decoding vector ``a`` with
``supp(a) ⊆ I`` and ``aᵀB = 1ᵀ``, so ``Σ_i a_i f_i = Σ_j h_j`` exactly. Two codes are offered:

* :class:`FractionalRepetitionCode`: needs ``(s + 1) | n``. Workers form ``n/(s+1)`` groups of
  ``s + 1`` consecutive workers; every worker of group ``q`` holds that group's ``s + 1``
  partitions and sends their plain sum, ``B = I_{n/(s+1)} ⊗ 1_{(s+1)×(s+1)}``. Decoding takes the
  *first* responder of each group (weight 1, all others 0), so it is exact in any precision.
* :class:`CyclicRepetitionCode`: any ``s < n``. Worker ``i`` holds partitions
  ``i, i+1, …, i+s (mod n)``. As in the paper's Algorithm 2 (and the authors' ``get_B``), a
  random ``H ∈ R^{s×n}`` with ``H·1 = 0`` is drawn (seeded here), ``B_{i,i} = 1`` and the other
  ``s`` entries of row ``i`` solve ``H b_i = 0``; the rows span ``null(H) ∋ 1``, and any ``n − s``
  of them do too (almost surely), so decoding solves the small system ``B_Iᵀ a_I = 1`` in float64.

**Sequential gradient coding** (N. Krishnan, R. Ebrahimi, A. Khisti, "Sequential Gradient Coding
For Straggler Mitigation", ICLR 2023) codes *across rounds*: a master that may decode job ``t``
``T`` rounds late tolerates more stragglers at the same load, under the ``(B, W, λ)``-bursty model
(within any ``W`` consecutive rounds at most ``λ`` distinct stragglers, each straggling in one burst
of at most ``B`` rounds; see :mod:`gradkit.distributed.stragglers`).

* :class:`SelectiveRepeatSGC` (needs ``B | (W − 1)``): every job is coded with an ``(n, s)`` code,
  ``s = ⌈Bλ / (W − 1 + B)⌉``. In round ``t`` every worker computes its job-``t`` task, except that
  if ``v > s`` results of job ``t − B`` are missing, the ``v − s`` lowest-indexed of those workers
  compute their job-``(t − B)`` task again. Job ``t`` is decoded at the end of round ``t + B``
  from the distinct job-``t`` results of rounds ``t`` and ``t + B``. "Missing" means: the worker's
  round-``(t − B)`` result is not a job-``(t − B)`` result, which counts stragglers *and* workers
  that were busy repeating an older job (the later, consistent version of the authors' file).
* :class:`MultiplexedSGC` (the paper's main scheme): each worker's round is ``W − 1 + B``
  equal-sized mini-tasks, slot ``m`` belonging to job ``r − m``, so job ``t`` is spread over rounds
  ``t .. t + T`` with ``T = W − 2 + B``. The first ``W − 1`` slots of a job are uncoded "D1"
  mini-tasks (worker ``i``'s own chunks of the job's D1 data); each of the last ``B`` slots is one
  "D2" group coded with an ``(n, λ)`` gradient code, except that a worker still missing a D1 chunk
  of that job redoes its lowest missing chunk instead. Job ``t`` is decoded at the end of round
  ``t + T`` from all D1 chunks and, per D2 group, the code's decoding weights. The D1 share of the
  data is ``x = (λ+1)(W−1) / (B + (W−1)(λ+1))`` (``x = 1`` for ``λ = n``), which makes every
  mini-task the same size and the normalised load ``(λ+1)(W−1+B) / (n(B + (W−1)(λ+1)))``.
* :class:`GradientCodingScheme` wraps a plain code in the same round-by-round interface
  (``T = 0``), the baseline both papers compare with. Its decodability check is "at most ``s``
  stragglers" (or, more generally, "the code decodes"); the SGC authors' baseline file checks
  ``< s``, an off-by-one not copied.

A scheme is driven round by round (:func:`simulate_coded` does it in one process; the Ray runtime
does it with actors): ``tasks(r)`` says what each worker computes, ``admits(stragglers)`` whether
the master may go on without some workers (otherwise it waits for everyone, as in the authors'
simulation), ``record(r, stragglers)`` stores who did not answer, and ``decode(job)`` lists the
received results and weights that add up to job's full gradient. A straggler set the scheme
cannot decode raises :class:`UndecodableError` saying which workers or groups are missing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gradkit._checks import check_positive_int
from gradkit.distributed.stragglers import (
    _as_mask,
    bursty_admits,
    check_bursty_parameters,
    stragglers_from_delays,
)
from gradkit.errors import GradkitError

__all__ = [
    "CodedRun",
    "CodingScheme",
    "Contribution",
    "CyclicRepetitionCode",
    "FractionalRepetitionCode",
    "GradientCode",
    "GradientCodingScheme",
    "MultiplexedSGC",
    "SelectiveRepeatSGC",
    "Task",
    "UndecodableError",
    "close_round",
    "combine",
    "simulate_coded",
]


class UndecodableError(GradkitError, RuntimeError):
    """The results received so far do not determine the full gradient."""


def _check_s(n: int, s: object) -> None:
    if isinstance(s, bool) or not isinstance(s, int) or s < 0:
        raise ValueError(f"Invalid s value: {s!r} (must be a non-negative integer)")
    if s >= n:
        raise ValueError(f"Invalid s value: {s} (must be smaller than the number of workers {n})")


# --------------------------------------------------------------------------------------------
# Base gradient codes
# --------------------------------------------------------------------------------------------


class GradientCode:
    """An ``(n, s)`` gradient code: encoding matrix :attr:`B` (``n × k``, float64) and decoding.

    Subclasses build ``B`` and implement :meth:`decode`.
    """

    B: Tensor

    def __init__(self, n: int, s: int) -> None:
        check_positive_int("n", n)
        _check_s(n, s)
        self.n, self.s = n, s

    @property
    def k(self) -> int:
        """Number of data partitions."""
        return self.B.shape[1]

    @property
    def load(self) -> float:
        """Fraction of the data each worker processes, ``(s + 1)/k``."""
        return (self.s + 1) / self.k

    def partitions(self, worker: int) -> list[int]:
        """The partitions ``worker`` needs (the support of its row of ``B``)."""
        return torch.nonzero(self.B[worker]).flatten().tolist()

    def encode(self, partials: Tensor) -> Tensor:
        """Every worker's message ``B @ partials`` from the ``(k, ...)`` partial gradients."""
        if partials.shape[0] != self.k:
            raise ValueError(f"expected {self.k} partial gradients, got {partials.shape[0]}")
        return torch.tensordot(self.B.to(partials.dtype), partials, dims=1)

    def decode(self, responders: Iterable[int]) -> Tensor:
        """Decoding weights ``a`` (length ``n``, float64, zero outside ``responders``) with
        ``aᵀB = 1ᵀ``. ``responders`` lists the workers that answered, in arrival order.

        Raises:
            UndecodableError: the responders do not determine the full gradient.
        """
        raise NotImplementedError

    def combine(self, results: Mapping[int, Tensor]) -> Tensor:
        """The full gradient ``Σ_i a_i f_i`` from ``{worker: message}`` in arrival order."""
        a = self.decode(results.keys())
        out = None
        for i, f in results.items():
            if a[i] != 0:
                term = f * a[i].item()
                out = term if out is None else out + term
        assert out is not None  # a decodable set has a non-zero weight
        return out

    def _responders(self, responders: Iterable[int]) -> list[int]:
        out = [int(i) for i in responders]
        for i in out:
            if not 0 <= i < self.n:
                raise ValueError(f"responder {i} out of range for n = {self.n} workers")
        if len(set(out)) != len(out):
            raise ValueError(f"responders must be distinct, got {out}")
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, s={self.s})"


class FractionalRepetitionCode(GradientCode):
    """Fractional repetition code for ``n`` workers and ``s`` stragglers, ``(s + 1) | n``.

    ``B = I_{n/(s+1)} ⊗ 1_{(s+1)×(s+1)}``: group ``q`` (workers ``q(s+1) .. q(s+1)+s``) holds
    partitions ``q(s+1) .. q(s+1)+s`` and each of its workers sends their sum. Decoding keeps the
    first responder of each group, so any ``s`` stragglers (and more, as long as no group is
    silent) are tolerated, exactly.

    Args:
        n: number of workers (= number of partitions).
        s: number of stragglers tolerated; ``s + 1`` must divide ``n``.
    """

    def __init__(self, n: int, s: int) -> None:
        super().__init__(n, s)
        if n % (s + 1):
            raise ValueError(
                f"Invalid s value: {s} (FractionalRepetitionCode needs s + 1 to divide "
                f"n = {n}; use CyclicRepetitionCode for any s < n)"
            )
        self.groups = n // (s + 1)
        block = torch.ones(s + 1, s + 1, dtype=torch.float64)
        self.B = torch.kron(torch.eye(self.groups, dtype=torch.float64), block)

    def group(self, worker: int) -> int:
        """The group of ``worker``."""
        return worker // (self.s + 1)

    def decode(self, responders: Iterable[int]) -> Tensor:
        order = self._responders(responders)
        a = torch.zeros(self.n, dtype=torch.float64)
        covered: set[int] = set()
        for i in order:
            q = self.group(i)
            if q not in covered:
                covered.add(q)
                a[i] = 1.0
        if len(covered) < self.groups:
            q = min(set(range(self.groups)) - covered)
            members = list(range(q * (self.s + 1), (q + 1) * (self.s + 1)))
            raise UndecodableError(
                f"no worker of group {q} (workers {members}) responded: {self!r} needs one "
                f"responder per group (any {self.s} stragglers are tolerated)"
            )
        return a


class CyclicRepetitionCode(GradientCode):
    """Cyclic repetition code for ``n`` workers and any ``s < n`` stragglers.

    Worker ``i`` holds partitions ``i .. i+s (mod n)``. A seeded Gaussian ``H ∈ R^{s×n}`` with
    ``H·1 = 0`` (last column minus the sum of the others) fixes ``B``: ``B_{i,i} = 1`` and the
    remaining ``s`` entries of row ``i`` solve ``H_{:,S_i∖i} x = −H_{:,i}``. Decoding from the
    first ``n − s`` responders solves ``B_Iᵀ a_I = 1`` by least squares in float64 and checks the
    residual. Random codes can be ill-conditioned for larger ``n`` (decoding weights grow, and
    so does the rounding error); the fractional repetition code has 0/1 weights.

    Args:
        n: number of workers (= number of partitions).
        s: number of stragglers tolerated, ``0 <= s < n``.
        seed: seed of ``H`` (default: 0); the same seed gives the same ``B``.
    """

    #: largest ``‖B_Iᵀ a − 1‖_∞`` accepted as a solution (an undecodable set leaves O(1))
    tol = 1e-6

    def __init__(self, n: int, s: int, seed: int = 0) -> None:
        super().__init__(n, s)
        self.seed = seed
        B = torch.zeros(n, n, dtype=torch.float64)
        if s == 0:
            B = torch.eye(n, dtype=torch.float64)
        else:
            gen = torch.Generator().manual_seed(seed)
            H = torch.randn(s, n, generator=gen, dtype=torch.float64)
            H[:, -1] = -H[:, :-1].sum(dim=1)
            for i in range(n):
                rest = [(i + j) % n for j in range(1, s + 1)]
                B[i, i] = 1.0
                B[i, rest] = torch.linalg.solve(H[:, rest], -H[:, i])
        self.B = B

    def decode(self, responders: Iterable[int]) -> Tensor:
        order = self._responders(responders)[: self.n - self.s]
        a = torch.zeros(self.n, dtype=torch.float64)
        if order:
            rows = self.B[order]  # (m, n)
            ones = torch.ones(self.n, 1, dtype=torch.float64)
            sol = torch.linalg.lstsq(rows.T, ones, driver="gelsd").solution.flatten()
            residual = (rows.T @ sol - 1.0).abs().max().item()
            if residual <= self.tol:
                a[order] = sol
                return a
        missing = sorted(set(range(self.n)) - set(order))
        raise UndecodableError(
            f"workers {order} cannot be decoded by {self!r}: it needs any {self.n - self.s} "
            f"responders, got {len(order)} (missing {missing})"
        )


CodeSpec = str | Callable[[int, int], GradientCode] | None


def _make_code(n: int, s: int, code: CodeSpec) -> GradientCode:
    if callable(code):
        return code(n, s)
    if code is None:
        code = "fractional" if n % (s + 1) == 0 else "cyclic"
    if code == "fractional":
        return FractionalRepetitionCode(n, s)
    if code == "cyclic":
        return CyclicRepetitionCode(n, s)
    raise ValueError(
        f"Invalid code value: {code!r} (expected 'fractional', 'cyclic' or a callable)"
    )


# --------------------------------------------------------------------------------------------
# Round-by-round schemes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One piece of work: ``Σ_j weights[j] · h(job, partitions[j])``."""

    job: int
    partitions: tuple[int, ...]
    weights: tuple[float, ...]

    def compute(self, partial_gradient: Callable[[int, int], Tensor]) -> Tensor:
        """Evaluate the task with ``partial_gradient(job, partition)``."""
        out = None
        for p, w in zip(self.partitions, self.weights):
            term = partial_gradient(self.job, p)
            term = term if w == 1.0 else term * w
            out = term if out is None else out + term
        assert out is not None
        return out


@dataclass(frozen=True)
class Contribution:
    """Result of ``worker``'s ``slot`` in ``round`` enters a job's gradient with ``weight``."""

    round: int
    worker: int
    slot: int
    weight: float


def _row_task(code: GradientCode, worker: int, job: int, offset: int = 0) -> Task:
    parts = code.partitions(worker)
    weights = tuple(float(code.B[worker, p]) for p in parts)
    return Task(job, tuple(offset + p for p in parts), weights)


class CodingScheme:
    """Base of the round-by-round schemes: the tasks handed out per round and who straggled."""

    n: int
    #: decoding delay: job ``t`` is decoded at the end of round ``t + T``
    T: int
    #: tasks per worker per round
    slots: int
    #: partitions of one job's data
    num_partitions: int

    def __init__(self, n: int, jobs: int | None) -> None:
        if jobs is not None:
            check_positive_int("jobs", jobs)
        self.n, self.jobs = n, jobs
        self._tasks: list[list[list[Task | None]]] = []
        self._stragglers: list[Tensor] = []

    # -- what the subclasses define --------------------------------------------------------
    def _assign(self, r: int) -> list[list[Task | None]]:
        raise NotImplementedError

    def admits(self, stragglers: Tensor | Sequence[int] | set[int]) -> bool:
        """Whether the master may finish the next round without ``stragglers``."""
        raise NotImplementedError

    def decode(self, job: int) -> list[Contribution]:
        """The received results (and weights) whose sum is ``job``'s full gradient."""
        raise NotImplementedError

    def partition_fractions(self) -> Tensor:
        """Share of one job's data in each partition (sums to 1)."""
        return torch.full((self.num_partitions,), 1.0 / self.num_partitions, dtype=torch.float64)

    @property
    def load(self) -> float:
        """Normalised load: share of one job's data a worker processes per round."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------
    @property
    def rounds(self) -> int:
        """Rounds recorded so far."""
        return len(self._stragglers)

    @property
    def total_rounds(self) -> int:
        """Rounds needed to decode every job: ``jobs + T``."""
        if self.jobs is None:
            raise ValueError("this scheme was built without a number of jobs (jobs=None)")
        return self.jobs + self.T

    @property
    def history(self) -> Tensor:
        """``(rounds, n)`` boolean mask of the recorded stragglers."""
        if not self._stragglers:
            return torch.zeros(0, self.n, dtype=torch.bool)
        return torch.stack(self._stragglers)

    def _recent(self, rounds: int) -> Tensor:
        """The last ``rounds`` rows of :attr:`history` (all a window check needs)."""
        recent = self._stragglers[max(0, self.rounds - rounds):]
        if not recent:
            return torch.zeros(0, self.n, dtype=torch.bool)
        return torch.stack(recent)

    def _live(self, job: int) -> bool:
        return job >= 0 and (self.jobs is None or job < self.jobs)

    def tasks(self, r: int) -> list[list[Task | None]]:
        """``tasks(r)[i][slot]``: what worker ``i`` computes in round ``r`` (``None``: idle).

        ``r`` is the next round (its tasks are assigned from the recorded history) or a past one.
        """
        if r < len(self._tasks):
            return self._tasks[r]
        if r != self.rounds:
            raise ValueError(f"round {r} requested, but the next round is {self.rounds}")
        self._tasks.append(self._assign(r))
        return self._tasks[r]

    def record(self, r: int, stragglers: Tensor | Sequence[int] | set[int]) -> None:
        """Store the workers whose round-``r`` results did not arrive."""
        if r != self.rounds or len(self._tasks) <= r:
            raise ValueError(f"record round {r} after tasks({r}); the next round is {self.rounds}")
        self._stragglers.append(_as_mask(stragglers, self.n).clone())

    def delivered(self, r: int, worker: int, slot: int = 0) -> Task | None:
        """The task whose result arrived from ``worker``'s ``slot`` in round ``r``, if any."""
        if r < 0 or r >= self.rounds or self._stragglers[r][worker]:
            return None
        return self._tasks[r][worker][slot]

    def decodable_job(self, r: int) -> int | None:
        """The job decoded at the end of round ``r`` (``None`` if there is none)."""
        job = r - self.T
        return job if self._live(job) else None

    def _check_decodable_round(self, job: int) -> None:
        if not self._live(job):
            raise ValueError(f"no job {job} in this scheme")
        if job + self.T >= self.rounds:
            raise ValueError(f"job {job} is decoded after round {job + self.T}; record it first")


class GradientCodingScheme(CodingScheme):
    """Plain gradient coding as a round-by-round scheme (``T = 0``, one task per round).

    Args:
        code: the ``(n, s)`` gradient code used for every job.
        jobs: number of jobs (``None``: unbounded).
    """

    T = 0
    slots = 1

    def __init__(self, code: GradientCode, jobs: int | None = None) -> None:
        super().__init__(code.n, jobs)
        self.code = code
        self.num_partitions = code.k

    @property
    def load(self) -> float:
        return self.code.load

    def _assign(self, r: int) -> list[list[Task | None]]:
        live = self._live(r)
        return [[_row_task(self.code, i, r) if live else None] for i in range(self.n)]

    def admits(self, stragglers: Tensor | Sequence[int] | set[int]) -> bool:
        mask = _as_mask(stragglers, self.n)
        try:
            self.code.decode(torch.nonzero(~mask).flatten().tolist())
        except UndecodableError:
            return False
        return True

    def decode(self, job: int) -> list[Contribution]:
        self._check_decodable_round(job)
        responders = [i for i in range(self.n) if self.delivered(job, i) is not None]
        a = self.code.decode(responders)
        return [Contribution(job, i, 0, a[i].item()) for i in responders if a[i] != 0]


class SelectiveRepeatSGC(CodingScheme):
    """Selective-Repeat Sequential Gradient Coding for the ``(B, W, λ)``-bursty model.

    Tolerates every bursty pattern with an ``(n, s)`` code per job, ``s = ⌈Bλ/(W − 1 + B)⌉``,
    decoding job ``t`` at the end of round ``t + B``; see the module docstring for the rule.

    Args:
        n: number of workers.
        B: maximum burst length (must divide ``W − 1``).
        W: window length.
        lam: maximum number of distinct stragglers per window.
        jobs: number of jobs (``None``: unbounded); ``B`` extra rounds only repeat.
        code: ``"fractional"``, ``"cyclic"``, a callable ``(n, s) -> GradientCode``, or ``None``
            (default: fractional repetition when ``(s + 1) | n``, cyclic otherwise).
    """

    slots = 1

    def __init__(
        self,
        n: int,
        B: int,
        W: int,
        lam: int,
        jobs: int | None = None,
        code: CodeSpec = None,
    ) -> None:
        check_bursty_parameters(n, B, W, lam)
        if (W - 1) % B:
            raise ValueError(
                f"Invalid W value: {W} (SelectiveRepeatSGC needs B = {B} to divide W - 1 = {W - 1})"
            )
        super().__init__(n, jobs)
        self.B, self.W, self.lam = B, W, lam
        self.T = B
        self.s = math.ceil(B * lam / (W - 1 + B))
        self.code = _make_code(n, self.s, code)
        self.num_partitions = self.code.k

    @property
    def load(self) -> float:
        return self.code.load

    def _missing(self, job: int) -> list[int]:
        """Workers whose round-``job`` result is not a job-``job`` result, by index."""
        out = []
        for i in range(self.n):
            task = self.delivered(job, i)
            if task is None or task.job != job:
                out.append(i)
        return out

    def _assign(self, r: int) -> list[list[Task | None]]:
        tasks: list[Task | None] = [
            _row_task(self.code, i, r) if self._live(r) else None for i in range(self.n)
        ]
        old = r - self.B
        if self._live(old):
            missing = self._missing(old)
            for i in missing[: max(0, len(missing) - self.s)]:
                tasks[i] = _row_task(self.code, i, old)
        return [[t] for t in tasks]

    def admits(self, stragglers: Tensor | Sequence[int] | set[int]) -> bool:
        return bursty_admits(self._recent(self.W - 1), stragglers, self.B, self.W, self.lam)

    def decode(self, job: int) -> list[Contribution]:
        self._check_decodable_round(job)
        found: list[tuple[int, int]] = []  # (round, worker)
        for r in (job, job + self.B):
            for i in range(self.n):
                task = self.delivered(r, i)
                if task is not None and task.job == job:
                    found.append((r, i))
        try:
            a = self.code.decode([i for _, i in found])
        except UndecodableError as exc:
            raise UndecodableError(f"job {job}: {exc}") from exc
        return [Contribution(r, i, 0, a[i].item()) for r, i in found if a[i] != 0]


class MultiplexedSGC(CodingScheme):
    """Multiplexed Sequential Gradient Coding (M-SGC) for the ``(B, W, λ)``-bursty model.

    Each round, every worker runs ``W − 1 + B`` equal mini-tasks (slot ``m`` for job ``r − m``);
    job ``t`` is decoded at the end of round ``t + W − 2 + B``. Partitions of one job: first the
    ``n(W − 1)`` D1 chunks (worker ``i``'s chunk ``m`` is partition ``i(W − 1) + m``), then ``B``
    groups of the ``(n, λ)`` code's ``k`` partitions (group ``g``'s partition ``p`` is
    ``n(W − 1) + g·k + p``); :meth:`partition_fractions` gives their sizes. See the module
    docstring for the rule.

    Args:
        n: number of workers.
        B: maximum burst length.
        W: window length.
        lam: maximum number of distinct stragglers per window (``λ = n`` leaves no D2 data).
        jobs: number of jobs (``None``: unbounded).
        code: the D2 code: ``"fractional"``, ``"cyclic"``, a callable ``(n, λ) -> GradientCode``,
            or ``None`` (default: fractional when ``(λ + 1) | n``, cyclic otherwise).
    """

    def __init__(
        self,
        n: int,
        B: int,
        W: int,
        lam: int,
        jobs: int | None = None,
        code: CodeSpec = None,
    ) -> None:
        check_bursty_parameters(n, B, W, lam)
        super().__init__(n, jobs)
        self.B, self.W, self.lam = B, W, lam
        self.d1, self.d2 = W - 1, B
        self.slots = W - 1 + B
        self.T = W - 2 + B
        self.code = _make_code(n, lam, code) if lam < n else None
        self._k2 = self.code.k if self.code is not None else 0
        self.num_partitions = n * self.d1 + B * self._k2

    @property
    def d1_share(self) -> float:
        """Share ``x`` of a job's data in the uncoded D1 part."""
        if self.code is None:
            return 1.0
        a = (self.lam + 1) * self.d1
        return a / (self.B + a)

    @property
    def load(self) -> float:
        """Share of a job's data a worker's ``W − 1 + B`` mini-tasks make up (with ``λ = n`` the
        ``B`` slots only serve repeats and idle otherwise)."""
        return self.slots * self.d1_share / (self.n * self.d1)

    def partition_fractions(self) -> Tensor:
        x = self.d1_share
        d1 = torch.full((self.n * self.d1,), x / (self.n * self.d1), dtype=torch.float64)
        if self.code is None:
            return d1
        d2 = torch.full((self.B * self._k2,), (1 - x) / (self.B * self._k2), dtype=torch.float64)
        return torch.cat([d1, d2])

    def _d1_missing(self, worker: int, job: int, upto: int) -> list[int]:
        """D1 chunks of ``job`` that ``worker`` has not delivered in rounds before ``upto``."""
        got = set()
        for r in range(max(job, 0), upto):
            task = self.delivered(r, worker, r - job)
            if task is not None and task.partitions[0] < self.n * self.d1:
                got.add(task.partitions[0] - worker * self.d1)
        return [m for m in range(self.d1) if m not in got]

    def _assign(self, r: int) -> list[list[Task | None]]:
        out: list[list[Task | None]] = []
        for i in range(self.n):
            row: list[Task | None] = []
            for m in range(self.slots):
                job = r - m
                if not self._live(job):
                    row.append(None)
                elif m < self.d1:
                    row.append(Task(job, (i * self.d1 + m,), (1.0,)))
                elif missing := self._d1_missing(i, job, r):
                    row.append(Task(job, (i * self.d1 + missing[0],), (1.0,)))
                elif self.code is not None:
                    offset = self.n * self.d1 + (m - self.d1) * self._k2
                    row.append(_row_task(self.code, i, job, offset))
                else:
                    row.append(None)
            out.append(row)
        return out

    def admits(self, stragglers: Tensor | Sequence[int] | set[int]) -> bool:
        return bursty_admits(self._recent(self.W - 1), stragglers, self.B, self.W, self.lam)

    def decode(self, job: int) -> list[Contribution]:
        self._check_decodable_round(job)
        d1: dict[int, Contribution] = {}
        groups: list[list[tuple[int, int]]] = [[] for _ in range(self.B)]  # (round, worker)
        for r in range(job, job + self.T + 1):
            m = r - job
            for i in range(self.n):
                task = self.delivered(r, i, m)
                if task is None:
                    continue
                p = task.partitions[0]
                if p < self.n * self.d1:
                    d1.setdefault(p, Contribution(r, i, m, 1.0))
                else:
                    groups[m - self.d1].append((r, i))
        lost = sorted(set(range(self.n * self.d1)) - set(d1))
        if lost:
            w, c = divmod(lost[0], self.d1)
            raise UndecodableError(f"job {job}: D1 chunk {c} of worker {w} never arrived")
        out = [d1[p] for p in sorted(d1)]
        if self.code is not None:
            for g, found in enumerate(groups):
                try:
                    a = self.code.decode([i for _, i in found])
                except UndecodableError as exc:
                    raise UndecodableError(f"job {job}, D2 group {g}: {exc}") from exc
                m = self.d1 + g
                out += [Contribution(r, i, m, a[i].item()) for r, i in found if a[i] != 0]
        return out


# --------------------------------------------------------------------------------------------
# In-process simulation
# --------------------------------------------------------------------------------------------


@dataclass
class CodedRun:
    """What :func:`simulate_coded` returns."""

    #: full gradient of every job, decoded
    gradients: list[Tensor]
    #: ``(rounds, n)`` stragglers the master went on without
    stragglers: Tensor
    #: rounds in which the pattern was outside the scheme's model, so the master waited for all
    waited_for_all: list[int] = field(default_factory=list)
    #: wall time of every round when delays were given (``None`` otherwise)
    durations: Tensor | None = None


def combine(
    contributions: Iterable[Contribution], results: Mapping[tuple[int, int, int], Tensor]
) -> Tensor:
    """``Σ weight · results[(round, worker, slot)]`` over ``contributions``."""
    out = None
    for c in contributions:
        term = results[(c.round, c.worker, c.slot)]
        term = term if c.weight == 1.0 else term * c.weight
        out = term if out is None else out + term
    if out is None:
        raise UndecodableError("nothing to combine")
    return out


def close_round(
    scheme: CodingScheme, r: int, late: Tensor, results: dict[tuple[int, int, int], Tensor]
) -> Tensor | None:
    """Record round ``r``'s stragglers ``late`` in ``scheme``; if a job became decodable, return
    its gradient and drop the results it was the last to need (later jobs only read rounds
    after it). ``results``: ``(round, worker, slot) -> Tensor`` of everything received."""
    scheme.record(r, late)
    job = scheme.decodable_job(r)
    if job is None:
        return None
    grad = combine(scheme.decode(job), results)
    for key in [key for key in results if key[0] <= job]:
        del results[key]
    return grad


def simulate_coded(
    scheme: CodingScheme,
    partial_gradient: Callable[[int, int], Tensor],
    *,
    stragglers: Tensor | None = None,
    delays: Tensor | None = None,
    mu: float = 0.0,
) -> CodedRun:
    """Run a scheme on one process and decode every job.

    Straggler input, one of:

    * ``stragglers``: a ``(rounds, n)`` boolean pattern (rows past its end: nobody straggles);
    * ``delays`` (``(rounds, n)``) and ``mu``: as in the SGC authors' simulation, the workers
      slower than ``(1 + mu)·`` the fastest straggle, and the round lasts ``(1 + mu)·`` the fastest
      delay, unless the pattern is outside the scheme's model: then the master waits for all and
      the round lasts the slowest delay.

    In both cases a pattern the scheme does not admit is replaced by "wait for everyone".

    Args:
        scheme: a fresh scheme (no round recorded) with a finite number of jobs.
        partial_gradient: ``(job, partition) -> Tensor``, the gradient of one partition.
    """
    if scheme.rounds:
        raise ValueError("simulate_coded needs a fresh scheme (no round recorded yet)")
    rounds = scheme.total_rounds
    n = scheme.n
    if stragglers is not None and delays is not None:
        raise ValueError("give either stragglers or delays, not both")
    if delays is not None and delays.shape[0] < rounds:
        raise ValueError(f"delays cover {delays.shape[0]} rounds, the scheme needs {rounds}")
    no_one = torch.zeros(n, dtype=torch.bool)
    results: dict[tuple[int, int, int], Tensor] = {}
    grads: list[Tensor] = []
    effective, waited, durations = [], [], []
    for r in range(rounds):
        tasks = scheme.tasks(r)
        if delays is not None:
            late = stragglers_from_delays(delays[r], mu)
        elif stragglers is not None and r < stragglers.shape[0]:
            late = stragglers[r]
        else:
            late = no_one
        if bool(late.any()) and not scheme.admits(late):
            waited.append(r)
            late = no_one
        if delays is not None:
            # going on without stragglers: the master waited until (1 + mu)·fastest;
            # otherwise it waited for the last worker
            deadline = delays[r].min() * (1.0 + mu)
            durations.append(deadline if late.any() else delays[r].max())
        for i in range(n):
            if late[i]:
                continue
            for m, task in enumerate(tasks[i]):
                if task is not None:
                    results[(r, i, m)] = task.compute(partial_gradient)
        effective.append(late)
        grad = close_round(scheme, r, late, results)
        if grad is not None:
            grads.append(grad)
    dur = torch.stack(durations) if durations else None
    return CodedRun(grads, torch.stack(effective), waited, dur)
