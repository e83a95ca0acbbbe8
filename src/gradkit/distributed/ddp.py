r"""Robust aggregation under ``torch.distributed`` (torchrun; gloo on CPU, NCCL on GPU).

Every rank is one worker. Two paths, chosen by the rule:

* **Coordinate-wise rules** (``Mean``, ``CoordinateMedian``, ``TrimmedMean``): a DDP
  communication hook (:class:`RobustCommHook`, :func:`register_robust_hook`). For each gradient
  bucket it all-gathers the bucket from every rank into an ``(n, numel)`` matrix, replaces the
  Byzantine ranks' rows by the attack, applies the aggregator and returns a Future holding a
  tensor of the bucket's shape, as the ``register_comm_hook`` contract asks (bucket tensors are
  not pre-divided by the world size, so the rule sees the raw per-rank gradients). A
  coordinate-wise rule is the same on each bucket as on the whole vector, so this *is* the
  published rule.
* **Whole-vector rules** (Krum, Multi-Krum, geometric median, NNM, centered clipping, clipping,
  bucketing, MDA, MoNNA, Flag Aggregator, …): applied per bucket they would compute distances and
  norms on pieces of the gradient and silently become a different rule, so the hook refuses them.
  Use :class:`RobustAllGather` instead: after ``loss.backward()`` on the plain (non-DDP) model it
  all-gathers the whole flattened gradient of every rank, applies the rule once and writes the
  result into ``p.grad``; then the optimizer steps on every rank.

A rule counts as coordinate-wise when it says so (a ``coordinatewise`` attribute) or, failing
that, when it is one of ``Mean``, ``CoordinateMedian``, ``TrimmedMean`` (a pipeline: when every
stage is); anything else is treated as whole-vector.

**Byzantine ranks** are simulated as in :class:`gradkit.distributed.simulator.Simulator`: the
ranks listed in ``byzantine`` still run, but after the all-gather every rank replaces their rows
by ``attack(honest rows, f=len(byzantine), generator=g)``, with ``g`` the simulator's attack
generator for ``(seed, round)`` (the simulator's own ``round_matrix``). Every rank therefore
computes the same aggregate, and a run with the same seeds, data and model reproduces the
simulator. Under the hook an attack is applied per bucket: the deterministic attacks of
:mod:`gradkit.distributed.attacks` (sign flipping, IPM, ALIE, Mimic, Inf) are coordinate-wise
and give the simulator's vectors; a random one (``Gaussian``) draws each bucket's noise from
the start of the round's stream, a valid attack but not the simulator's numbers. Attacks that need
gradients on flipped labels (``LabelFlipping``) are refused: run them in the simulator.

Stragglers: collectives are synchronous, so a slow rank delays every rank (up to the process
group's timeout). First-``n − s``-of-``n`` semantics need the Ray runtime
(:mod:`gradkit.distributed.ray_runtime`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradkit.distributed._runtime_checks import check_byzantine
from gradkit.distributed.aggregators import Aggregator
from gradkit.distributed.simulator import flatten, round_matrix, unflatten_into_grads

__all__ = [
    "RobustAllGather",
    "RobustCommHook",
    "check_process_group",
    "is_coordinatewise",
    "register_robust_hook",
    "robust_hook",
]

#: rules known to act on each coordinate separately (when the rule does not say itself)
_COORDINATEWISE = frozenset({"Mean", "CoordinateMedian", "TrimmedMean"})


def is_coordinatewise(aggregator: Any) -> bool:
    """Whether ``aggregator`` acts on every coordinate separately (safe per DDP bucket)."""
    flag = getattr(type(aggregator), "coordinatewise", None)
    if isinstance(flag, bool):
        return flag
    stages = [*getattr(aggregator, "pre", []), getattr(aggregator, "final", None)]
    if stages[-1] is not None:  # a pipeline: every stage must be
        return all(is_coordinatewise(s) for s in stages)
    return type(aggregator).__name__ in _COORDINATEWISE


def check_process_group(group: Any = None, world_size: int | None = None) -> int:
    """The number of ranks of ``group`` (default: the world), after checking it is usable.

    Raises:
        RuntimeError: ``torch.distributed`` is unavailable or not initialised.
        ValueError: ``world_size`` is given and differs from the group's size.
    """
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call "
            "torch.distributed.init_process_group('gloo') (or 'nccl' on GPUs) first; under "
            "torchrun the environment variables it needs are already set"
        )
    n = dist.get_world_size(group)
    if world_size is not None and world_size != n:
        raise ValueError(
            f"expected a world size of {world_size} but the process group has {n} ranks: launch "
            f"with `torchrun --nproc_per_node={world_size} ...` or pass world_size={n}"
        )
    return n


class _RobustRule:
    """What both paths share: the rule, the Byzantine ranks and the attack, checked for n."""

    def __init__(
        self,
        aggregator: Aggregator,
        *,
        byzantine: Sequence[int] = (),
        attack: Any = None,
        seed: int = 0,
        world_size: int | None = None,
        group: Any = None,
    ) -> None:
        if not callable(aggregator):
            raise TypeError(f"aggregator must be callable on an (n, d) tensor, got {aggregator!r}")
        self.n = check_process_group(group, world_size)
        self.group = group
        self.aggregator = aggregator
        self.byzantine = check_byzantine(type(self).__name__, byzantine, attack, self.n)
        self.attack = attack
        self.seed = seed
        check_n = getattr(aggregator, "check_n", None)
        if check_n is not None:
            check_n(self.n)  # the rule's own bound (e.g. Krum needs n > 2f), before any step
        #: rounds aggregated so far (the attack generator's round index)
        self.round = 0

    def _apply(self, X: Tensor, round: int) -> Tensor:
        """Attack the Byzantine rows of the gathered ``(n, d)`` matrix (the simulator's
        :func:`~gradkit.distributed.simulator.round_matrix` for ``(seed, round)``), then
        aggregate."""
        if self.byzantine:
            honest = [i for i in range(self.n) if i not in self.byzantine]
            X = round_matrix(X[honest], honest, self.byzantine, self.attack, seed=self.seed,
                             round=round)
        return self.aggregator(X)

    def _gather(self, vector: Tensor) -> list[Tensor]:
        parts = [torch.empty_like(vector) for _ in range(self.n)]
        dist.all_gather(parts, vector.contiguous(), group=self.group)
        return parts


class RobustAllGather(_RobustRule):
    """Any aggregation rule on the whole flattened gradient, by one all-gather per step.

    Usage on every rank (plain model, no DDP)::

        sync = RobustAllGather(Krum(f=1), byzantine=[3], attack=SignFlipping(), seed=0)
        for x, y in batches:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            sync.step(model)        # p.grad <- Krum of every rank's gradient
            opt.step()

    Args:
        aggregator: any :class:`~gradkit.distributed.aggregators.Aggregator`.
        byzantine: ranks whose vectors are replaced by ``attack`` (simulation).
        attack: a :mod:`gradkit.distributed.attacks` attack (needed with ``byzantine``).
        seed: seed of the attack's randomness (as the simulator's ``seed``).
        world_size: the expected number of ranks (checked against the process group).
        group: the process group (default: the world).

    Raises:
        RuntimeError: the process group is not initialised.
        ValueError: mismatched world size, bad Byzantine ranks, a rule whose bound fails for
            this world size, ranks holding vectors of different lengths.
    """

    def __init__(self, aggregator: Aggregator, **kwargs: Any) -> None:
        super().__init__(aggregator, **kwargs)
        self._checked_numel: int | None = None

    def _check_lengths(self, numel: int, device: torch.device) -> None:
        if self._checked_numel == numel:
            return
        # on the vector's device: NCCL gathers CUDA tensors only
        sizes = self._gather(torch.tensor([numel], dtype=torch.int64, device=device))
        sizes = [int(s) for s in sizes]
        if len(set(sizes)) != 1:
            raise ValueError(
                f"ranks hold vectors of different lengths {sizes} (rank: length); every rank "
                "must run the same model"
            )
        self._checked_numel = numel

    def aggregate(self, vector: Tensor) -> Tensor:
        """All-gather ``vector`` (this rank's ``(d,)``) and return the aggregate (same on every
        rank)."""
        if vector.dim() != 1:
            raise ValueError(f"expected a flat (d,) vector, got shape {tuple(vector.shape)}")
        self._check_lengths(vector.numel(), vector.device)
        X = torch.stack(self._gather(vector))
        out = self._apply(X, self.round)
        self.round += 1
        return out

    def step(self, model: nn.Module | Iterable[Tensor]) -> Tensor:
        """Replace the gradients of ``model`` (or a list of parameters) by the aggregate.

        Parameters without a gradient count as zero. Returns the aggregated flat vector.
        """
        params = list(model.parameters()) if isinstance(model, nn.Module) else list(model)
        params = [p for p in params if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        g = self.aggregate(flatten(grads))
        unflatten_into_grads(g, params)
        return g


class RobustCommHook(_RobustRule):
    """A DDP communication hook for coordinate-wise rules.

    ``register(ddp_model)`` (or :func:`register_robust_hook`) installs it; it must be done
    once, before the first backward. A whole-vector rule is refused with a ``ValueError`` that
    points to :class:`RobustAllGather`. Arguments as for :class:`RobustAllGather`.
    """

    def __init__(self, aggregator: Aggregator, **kwargs: Any) -> None:
        if not is_coordinatewise(aggregator):
            raise ValueError(
                f"{aggregator!r} is a whole-vector rule: inside a DDP communication hook it would "
                "run on each gradient bucket separately and become a different rule. Use "
                "gradkit.distributed.ddp.RobustAllGather (an all-gather of the whole flattened "
                "gradient after backward, on a model without DDP) instead"
            )
        super().__init__(aggregator, **kwargs)

    def communicate(self, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        """All-gather one bucket, attack, aggregate; a Future of the bucket's shape."""
        buffer = bucket.buffer()
        parts = [torch.empty_like(buffer) for _ in range(self.n)]
        work = dist.all_gather(parts, buffer, group=self.group, async_op=True)
        # hooks are called in order on the backward thread; their callbacks may not be
        round_ = self.round
        if bucket.is_last():
            self.round += 1

        def finish(_: torch.futures.Future) -> Tensor:
            return self._apply(torch.stack(parts), round_).to(buffer.dtype).view_as(buffer)

        return work.get_future().then(finish)

    def register(self, ddp_model: nn.parallel.DistributedDataParallel) -> RobustCommHook:
        """Install the hook on ``ddp_model``; returns ``self``."""
        if not isinstance(ddp_model, nn.parallel.DistributedDataParallel):
            raise TypeError(
                "register() needs a torch.nn.parallel.DistributedDataParallel model, got "
                f"{type(ddp_model).__name__}; wrap it with DistributedDataParallel(model) first"
            )
        ddp_model.register_comm_hook(self, robust_hook)
        return self


def robust_hook(state, bucket):  # no annotations: DDP compares them with its own types
    """The function DDP calls per bucket: ``state`` is the :class:`RobustCommHook`."""
    return state.communicate(bucket)


def register_robust_hook(
    ddp_model: nn.parallel.DistributedDataParallel, aggregator: Aggregator, **kwargs: Any
) -> RobustCommHook:
    """Build a :class:`RobustCommHook` and register it on ``ddp_model`` (the world's group by
    default, or ``ddp_model.process_group``)."""
    kwargs.setdefault("group", getattr(ddp_model, "process_group", None))
    return RobustCommHook(aggregator, **kwargs).register(ddp_model)
