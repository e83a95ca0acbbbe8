r"""In-process simulation of n workers, f of them Byzantine, with any aggregator.

One round of :class:`Simulator`:

1. every honest worker i computes a minibatch gradient g_i at the current parameters on its
   own data shard (:func:`worker_gradient`), optionally smoothed by worker momentum
   m_i ← β m_i + (1 − β) g_i (ByzFL's honest clients send m_i);
2. the Byzantine workers' rows are replaced by the attack's vector, computed from the honest
   vectors (ByzFL semantics: one vector, sent by all f Byzantine workers);
3. the aggregator maps the (n, d) matrix to one vector, which is written into ``p.grad``;
4. the torch optimizer steps; the history records the honest workers' mean minibatch loss
   and, every ``eval_every`` rounds, loss and accuracy on the evaluation data.

Determinism: the minibatch of worker i in round t is a pure function of
``(seed, i, t)`` (:func:`worker_generator`), and so is the attack's randomness; the
gradient is a pure function of the model state and that minibatch. The pieces a distributed
runtime needs to reproduce the simulator are public and shared:

* :func:`setup_workload` — the shards, initial model, loss and evaluation data;
* :func:`worker_gradient` — worker i's gradient in round t (what rank i computes);
* :func:`round_matrix` — the (n, d) matrix after the attack, from the gathered honest rows;
* :func:`unflatten_into_grads` — the aggregate written into ``p.grad`` before the step.

The vectorised path (``vectorize=True``/``"auto"``) batches the same computation with
``torch.func.vmap``; it agrees with the per-worker loop to floating-point rounding (bitwise
on the digits MLP); ``vectorize=False`` is the per-worker computation itself.

Data heterogeneity: :func:`dirichlet_partition` splits a labelled dataset with Dirichlet(α)
label skew (smaller α = more skew; ``alpha=None`` = an i.i.d. split).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from gradkit.distributed import _validation as V
from gradkit.distributed.aggregators import Aggregator, Mean

__all__ = [
    "History",
    "Simulator",
    "WorkloadSetup",
    "dirichlet_partition",
    "flatten",
    "flip_labels",
    "round_matrix",
    "sample_batch",
    "setup_workload",
    "unflatten_into_grads",
    "worker_generator",
    "worker_gradient",
]

LossFn = Callable[[Tensor, Tensor], Tensor]

#: random streams derived from the seed: minibatch sampling, attack noise
DATA_STREAM, ATTACK_STREAM = 0, 1


# ------------------------------------------------------------------ deterministic pieces
def worker_generator(seed: int, worker: int, round: int, stream: int = DATA_STREAM
                     ) -> torch.Generator:
    """A CPU ``torch.Generator`` that depends only on ``(seed, stream, worker, round)``."""
    state = np.random.SeedSequence([seed, stream, worker, round]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def sample_batch(shard_size: int, batch_size: int | None, generator: torch.Generator) -> Tensor:
    """Minibatch indices into a shard: ``batch_size`` distinct indices (with replacement if
    the shard is smaller), or the whole shard when ``batch_size`` is None."""
    if batch_size is None:
        return torch.arange(shard_size)
    if shard_size >= batch_size:
        return torch.randperm(shard_size, generator=generator)[:batch_size]
    return torch.randint(0, shard_size, (batch_size,), generator=generator)


def flatten(tensors: Sequence[Tensor] | dict[str, Tensor]) -> Tensor:
    """Concatenate tensors (in order, or a dict's values in insertion order) to one vector."""
    values = tensors.values() if isinstance(tensors, dict) else tensors
    return torch.cat([t.reshape(-1) for t in values])


def unflatten_into_grads(vector: Tensor, params: Sequence[Tensor]) -> None:
    """Write a flat vector into ``p.grad`` of each parameter (the inverse of :func:`flatten`)."""
    offset = 0
    for p in params:
        k = p.numel()
        p.grad = vector[offset:offset + k].view_as(p).to(p.dtype).clone()
        offset += k
    if offset != vector.numel():
        raise ValueError(f"aggregated vector has {vector.numel()} entries, the model "
                         f"{offset}; the aggregator must return one entry per parameter")


def _functional_loss(model: nn.Module, loss_fn: LossFn):
    # buffers are an argument (not captured) so that modules updating them in place
    # (batch norm's running statistics) can run under torch.func.grad
    def loss(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, y: Tensor
             ) -> Tensor:
        return loss_fn(functional_call(model, {**params, **buffers}, (x,)), y)
    return loss


def flip_labels(y: Tensor, num_classes: int) -> Tensor:
    """ByzFL's label flipping: y ← (C − 1) − y."""
    return (num_classes - 1) - y


def worker_gradient(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    *,
    worker: int,
    round: int,
    seed: int,
    batch_size: int | None,
    params: dict[str, Tensor] | None = None,
    flip_to: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The flattened minibatch gradient of one worker, and its loss.

    A pure function of the model state (``params``, default the model's current parameters,
    plus its buffers), the worker's shard ``(x, y)``, ``worker``, ``round`` and ``seed``: the
    minibatch is :func:`sample_batch` under :func:`worker_generator` ``(seed, worker, round)``.
    ``flip_to=C`` flips the labels to ``C − 1 − y`` first (the label-flipping attack).

    Buffers are the model's own: a module that updates them in the forward pass (batch
    norm in training mode) updates the model's running statistics, worker after worker.

    Returns:
        ``(g, loss)``: g of shape (d,) in the order of ``model.named_parameters()``
        (parameters with ``requires_grad``), and the scalar minibatch loss.
    """
    if params is None:
        params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    idx = sample_batch(len(x), batch_size, worker_generator(seed, worker, round))
    xb, yb = x[idx], y[idx]
    if flip_to is not None:
        yb = flip_labels(yb, flip_to)
    grads, loss = grad_and_value(_functional_loss(model, loss_fn))(params, buffers, xb, yb)
    return flatten(grads), loss.detach()


def _vmapped_gradients(model, shards, workers, loss_fn, *, round, seed, batch_size, params,
                       flip_to):
    """:func:`worker_gradient` for several workers in one ``vmap`` call (equal batch sizes)."""
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    xs, ys = [], []
    for i in workers:
        x, y = shards[i]
        idx = sample_batch(len(x), batch_size, worker_generator(seed, i, round))
        xs.append(x[idx])
        ys.append(flip_labels(y[idx], flip_to) if flip_to is not None else y[idx])
    fn = vmap(grad_and_value(_functional_loss(model, loss_fn)), in_dims=(None, None, 0, 0))
    grads, losses = fn(params, buffers, torch.stack(xs), torch.stack(ys))
    return torch.cat([g.reshape(len(workers), -1) for g in grads.values()], dim=1), losses


def round_matrix(
    honest_vectors: Tensor,
    honest: Sequence[int],
    byzantine: Sequence[int],
    attack: Any,
    *,
    seed: int,
    round: int,
    attack_source: Tensor | None = None,
) -> Tensor:
    """The (n, d) matrix of one round: row ``honest[k]`` is ``honest_vectors[k]``, every
    Byzantine row is ``attack(attack_source or honest_vectors, f=len(byzantine),
    generator=worker_generator(seed, 0, round, ATTACK_STREAM))``.

    A pure function of its arguments, shared by the simulator and the distributed runtimes
    (which gather the honest vectors first).
    """
    n = len(honest) + len(byzantine)
    X = honest_vectors.new_empty((n, honest_vectors.shape[1]))
    X[list(honest)] = honest_vectors
    if byzantine:
        gen = worker_generator(seed, 0, round, stream=ATTACK_STREAM)
        source = honest_vectors if attack_source is None else attack_source
        X[list(byzantine)] = attack(source, f=len(byzantine), generator=gen)
    return X


@dataclass
class WorkloadSetup:
    """What a simulation (or a distributed runtime) needs from a gradkit array workload."""

    model: nn.Module
    loss_fn: LossFn
    metric_fn: Callable[[Tensor, Tensor], Tensor]
    shards: list[tuple[Tensor, Tensor]]
    eval_data: tuple[Tensor, Tensor]


def setup_workload(workload: Any, n_workers: int, *, alpha: float | None = None, seed: int = 0,
                   split: str = "val") -> WorkloadSetup:
    """Shards, model, loss and evaluation data of a gradkit array workload (e.g.
    ``gradkit.bench.workloads.DigitsMLP()``), deterministic in ``seed``.

    The training split is divided among ``n_workers`` by :func:`dirichlet_partition`
    ``(alpha, seed)``; the model is built after ``torch.manual_seed(seed)``; ``split``
    ("val" or "test") is the evaluation data. Every process of a distributed run calls this
    with the same arguments and gets the same shards and initial model.
    """
    if split not in ("val", "test"):
        raise ValueError(f"Invalid split value: {split!r} ('val' or 'test')")
    arrays = workload.arrays()
    parts = dirichlet_partition(arrays.y_train, n_workers, alpha, seed)
    shards = [(arrays.x_train[p], arrays.y_train[p]) for p in parts]
    torch.manual_seed(seed)
    model = workload.build_model()
    eval_data = (arrays.x_val, arrays.y_val) if split == "val" else (arrays.x_test,
                                                                     arrays.y_test)

    def loss_fn(out: Tensor, y: Tensor) -> Tensor:
        return workload.loss_and_metric(out, y)[0]

    def metric_fn(out: Tensor, y: Tensor) -> Tensor:
        return workload.loss_and_metric(out, y)[1]

    return WorkloadSetup(model, loss_fn, metric_fn, shards, eval_data)


# ------------------------------------------------------------------------------ data split
def dirichlet_partition(labels: Tensor, n_workers: int, alpha: float | None, seed: int
                        ) -> list[Tensor]:
    """Split sample indices among workers with Dirichlet(α) label skew.

    For each class c, the proportions p ~ Dirichlet(α·1_n) (NumPy, seeded by ``seed``) cut
    the class's shuffled indices into n consecutive pieces. ``alpha=None`` is an i.i.d.
    split (a shuffled, near-equal partition). A worker left without data gets one sample
    taken from the largest shard, so that every worker can compute a gradient.
    """
    V.check_count("dirichlet_partition", "n_workers", n_workers, minimum=1)
    rng = np.random.default_rng(seed)
    y = np.asarray(labels.cpu())
    if len(y) < n_workers:
        raise ValueError(f"dirichlet_partition: {len(y)} samples cannot be split among "
                         f"{n_workers} workers; use fewer workers")
    if alpha is None:
        return [torch.as_tensor(np.sort(s)) for s in np.array_split(rng.permutation(len(y)),
                                                                    n_workers)]
    alpha = V.check_real("dirichlet_partition", "alpha", alpha, positive=True)
    shards: list[list[int]] = [[] for _ in range(n_workers)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        p = rng.dirichlet(np.full(n_workers, alpha))
        cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
        for w, part in enumerate(np.split(idx, cuts)):
            shards[w].extend(part.tolist())
    for w in range(n_workers):
        if not shards[w]:
            donor = max(range(n_workers), key=lambda k: len(shards[k]))
            shards[w].append(shards[donor].pop())
    return [torch.as_tensor(sorted(s), dtype=torch.long) for s in shards]


# ------------------------------------------------------------------------------ simulator
@dataclass
class History:
    """Per-round records of a simulation (``eval_loss``/``accuracy`` are NaN off-eval)."""

    rounds: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)

    def append(self, record: dict[str, float]) -> None:
        self.rounds.append(int(record["round"]))
        self.train_loss.append(record["train_loss"])
        self.eval_loss.append(record.get("eval_loss", float("nan")))
        self.accuracy.append(record.get("accuracy", float("nan")))

    @property
    def final_accuracy(self) -> float:
        """The last evaluated accuracy (NaN if never evaluated)."""
        done = [a for a in self.accuracy if a == a]
        return done[-1] if done else float("nan")


class Simulator:
    """n workers in one process; the Byzantine ones replaced by an attack.

    Args:
        model: the shared model (its parameters are the ones the optimizer steps).
        loss_fn: ``loss_fn(output, target)`` → mean loss of a batch.
        shards: one ``(x, y)`` pair per worker (n = ``len(shards)``).
        aggregator: an :class:`~gradkit.distributed.aggregators.Aggregator` (default Mean).
        optimizer: a ``torch.optim.Optimizer`` over ``model.parameters()``, or a factory
            ``params -> Optimizer`` (default ``SGD(lr=0.1)``).
        byzantine: the Byzantine worker ids, or an int f for the last f workers.
        attack: a :mod:`gradkit.distributed.attacks` attack (required when f > 0).
        batch_size: minibatch per worker and round (None = the whole shard).
        worker_momentum: β of the honest workers' Polyak momentum (0 = plain gradients).
        seed: the seed of every random choice (minibatches, attack noise).
        eval_data: ``(x, y)`` for evaluation; ``metric_fn(output, y)`` → accuracy-like scalar.
        vectorize: ``True``/``False``/``"auto"``: compute the workers' gradients in one
            ``torch.func.vmap`` call (needs equal batch sizes; "auto" falls back to a loop
            when vmap cannot handle the model).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        shards: Sequence[tuple[Tensor, Tensor]],
        aggregator: Aggregator | None = None,
        optimizer: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None = None,
        *,
        byzantine: int | Sequence[int] = 0,
        attack: Any = None,
        batch_size: int | None = 32,
        worker_momentum: float = 0.0,
        seed: int = 0,
        eval_data: tuple[Tensor, Tensor] | None = None,
        metric_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        vectorize: bool | str = "auto",
    ):
        self.model, self.loss_fn = model, loss_fn
        self.shards = [(x, y) for x, y in shards]
        n = self.n = len(self.shards)
        if n == 0:
            raise ValueError("Simulator needs at least one worker shard")
        if isinstance(byzantine, int) and not isinstance(byzantine, bool):
            V.check_count("Simulator", "byzantine", byzantine)
            if byzantine >= n:
                raise ValueError(f"Simulator: f={byzantine} Byzantine workers out of n={n} "
                                 "leaves no honest worker; lower f")
            byzantine = list(range(n - byzantine, n))
        self.byzantine = V.check_indices("Simulator", "byzantine", list(byzantine), n)
        if len(self.byzantine) >= n:
            raise ValueError("Simulator: every worker is Byzantine; keep at least one honest")
        self.honest = [i for i in range(n) if i not in set(self.byzantine)]
        if self.byzantine and attack is None:
            raise ValueError("Simulator: Byzantine workers given but no attack; pass attack=, "
                             "e.g. gradkit.distributed.attacks.SignFlipping()")
        self.attack = attack
        self.aggregator = aggregator if aggregator is not None else Mean()
        if batch_size is not None:
            V.check_count("Simulator", "batch_size", batch_size, minimum=1)
        self.batch_size = batch_size
        beta = V.check_real("Simulator", "worker_momentum", worker_momentum, nonnegative=True)
        if beta >= 1:
            raise ValueError(f"Invalid worker_momentum value: {beta} (must be in [0, 1))")
        self.worker_momentum = beta
        self.seed = seed
        self.params = [p for p in model.parameters() if p.requires_grad]
        if optimizer is None:
            optimizer = torch.optim.SGD(self.params, lr=0.1)
        elif not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer(self.params)
        self.optimizer = optimizer
        self.eval_data, self.metric_fn = eval_data, metric_fn
        if vectorize not in (True, False, "auto"):
            raise ValueError(f"Invalid vectorize value: {vectorize!r} (True, False or 'auto')")
        self.vectorize = vectorize
        self.round = 0
        self._momentum: Tensor | None = None
        self.history = History()

    # ---------------------------------------------------------------- the workers' vectors
    def gradients(self, workers: Sequence[int], *, flip_to: int | None = None
                  ) -> tuple[Tensor, Tensor]:
        """(len(workers), d) gradients and their losses at the current parameters."""
        params = {k: p.detach() for k, p in self.model.named_parameters() if p.requires_grad}
        kwargs = dict(round=self.round, seed=self.seed, batch_size=self.batch_size,
                      params=params, flip_to=flip_to)
        if self.vectorize and self._equal_batches(workers):
            try:
                return _vmapped_gradients(self.model, self.shards, workers, self.loss_fn,
                                          **kwargs)
            except RuntimeError:
                if self.vectorize is True:
                    raise
                self.vectorize = False  # this model cannot be vmapped: loop from now on
        rows = [worker_gradient(self.model, *self.shards[i], self.loss_fn, worker=i, **kwargs)
                for i in workers]
        return torch.stack([g for g, _ in rows]), torch.stack([loss for _, loss in rows])

    def _equal_batches(self, workers: Sequence[int]) -> bool:
        if self.batch_size is not None:
            return True
        return len({len(self.shards[i][0]) for i in workers}) == 1

    def worker_vectors(self) -> tuple[Tensor, Tensor]:
        """The (n, d) matrix the aggregator sees this round (attack applied), and the
        honest workers' losses."""
        G, losses = self.gradients(self.honest)
        if self.worker_momentum > 0:
            if self._momentum is None:
                self._momentum = torch.zeros_like(G)
            self._momentum.mul_(self.worker_momentum).add_(G, alpha=1 - self.worker_momentum)
            G = self._momentum.clone()
        source = None
        if self.byzantine and getattr(self.attack, "needs_flipped_labels", False):
            flip_to = self._num_classes(getattr(self.attack, "flip_labels_to", None))
            source, _ = self.gradients(self.honest, flip_to=flip_to)
        X = round_matrix(G, self.honest, self.byzantine, self.attack, seed=self.seed,
                         round=self.round, attack_source=source)
        return X, losses

    def _num_classes(self, given: int | None) -> int:
        if given is not None:
            return given
        return int(max(int(y.max()) for _, y in self.shards)) + 1

    # ---------------------------------------------------------------------- one round
    def step(self) -> dict[str, float]:
        """One round (steps 1-4 of the module docstring); returns its record."""
        self.model.train()
        X, losses = self.worker_vectors()
        g = self.aggregator(X)
        self.optimizer.zero_grad(set_to_none=True)
        unflatten_into_grads(g, self.params)
        self.optimizer.step()
        record = {"round": self.round, "train_loss": float(losses.mean())}
        self.round += 1
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss (and metric) of the current model on ``eval_data``."""
        if self.eval_data is None:
            return {}
        self.model.eval()
        x, y = self.eval_data
        out = self.model(x)
        result = {"eval_loss": float(self.loss_fn(out, y))}
        if self.metric_fn is not None:
            result["accuracy"] = float(self.metric_fn(out, y))
        self.model.train()
        return result

    def run(self, rounds: int, eval_every: int = 1) -> History:
        """Run ``rounds`` rounds; evaluate after every ``eval_every``-th and the last."""
        V.check_count("Simulator.run", "rounds", rounds, minimum=1)
        V.check_count("Simulator.run", "eval_every", eval_every, minimum=1)
        for k in range(rounds):
            record = self.step()
            if (k + 1) % eval_every == 0 or k == rounds - 1:
                record.update(self.evaluate())
            self.history.append(record)
        return self.history

    # ------------------------------------------------------------------- construction
    @classmethod
    def from_workload(
        cls,
        workload: Any,
        n_workers: int,
        *,
        alpha: float | None = None,
        seed: int = 0,
        split: str = "val",
        **kwargs: Any,
    ) -> Simulator:
        """A simulator on a gradkit array workload via :func:`setup_workload`; ``kwargs`` go
        to the constructor (aggregator, attack, byzantine, optimizer, ...; ``batch_size``
        defaults to the workload's)."""
        setup = setup_workload(workload, n_workers, alpha=alpha, seed=seed, split=split)
        kwargs.setdefault("batch_size", getattr(workload, "batch_size", 32))
        return cls(setup.model, setup.loss_fn, setup.shards, seed=seed,
                   eval_data=setup.eval_data, metric_fn=setup.metric_fn, **kwargs)
