r"""In-process simulation of federated training over many clients.

One round t of :class:`FederatedSimulator`:

1. the participation model draws the set S_t (a pure function of ``(seed, t)``);
2. every participant i starts from the global model w_t, builds a fresh local torch
   optimizer (any: torch's or gradkit's) and runs K local steps
   ``p.grad ← algorithm gradient; optimizer.step()`` on minibatches of its own data drawn
   by :func:`~gradkit.distributed.simulator.sample_batch` under
   ``worker_generator(seed, i, t, LOCAL_STREAM)``; it sends Δ_i = w_{i,K} − w_t;
3. a client that raises, or whose Δ_i is not finite, is left out of the round and reported
   by id in the round's record (``failed``); the round goes on with the others;
4. the server weighs the rows (``weighting``: FedAvg's mean over participants, known 1/p_n,
   or FedAU's online estimate, both normalised by N), applies the aggregation rule (any
   :class:`~gradkit.distributed.aggregators.Aggregator`, default Mean) and adds the
   algorithm's server term (FedSpeed's mean correction), giving the update U_t;
5. the pseudo-gradient −U_t is written into ``p.grad`` and the server torch optimizer
   steps: FedAvg is ``SGD(lr=1)`` (w_{t+1} = w_t + U_t), FedAvgM ``SGD(lr=1, momentum=β)``,
   FedAdam ``Adam(lr=η)`` (Reddi et al., ICLR 2021).

With the uniform weighting and Mean, the rule sees the rows Δ_i; with ``"known"``/FedAU
the rows are scaled by |S_t|·ω_i/N first, so that Mean gives exactly (1/N)·Σ ω_i Δ_i (a
robust rule then sees the scaled rows). A round without any (successful) participant leaves
the model and the server optimizer untouched. The round's record holds ``participants``
(those whose update was used), ``failed`` ({id: reason}) and ``train_loss``, the
participants' mean minibatch loss at their first local step (at w_t).

Vectorisation: local training of clients with the same number of steps and batch shape is
one computation over stacked parameters: the gradient function under
``torch.func.vmap`` (over clients) and one optimizer over the stacked (C, ...) tensors. The
latter equals C separate optimizers only for element-wise optimizers (SGD, Adam, ...), so
``vectorize="auto"`` uses it for the torch optimizers in :data:`ELEMENTWISE_OPTIMIZERS`
and loops otherwise; ``vectorize=True`` asserts the user's optimizer is element-wise. The
vectorised path agrees with the loop to floating-point rounding. The local optimizer's
state is fresh every round (the common FL convention).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from gradkit.distributed import _validation as V
from gradkit.distributed.aggregators import Aggregator, Mean
from gradkit.distributed.simulator import (
    History,
    Simulator,
    _functional_loss,
    sample_batch,
    setup_workload,
    unflatten_into_grads,
    worker_generator,
)
from gradkit.federated.algorithms import FedAvg
from gradkit.federated.participation import FedAUWeights, FullParticipation
from gradkit.federated.partition import partition

__all__ = ["ELEMENTWISE_OPTIMIZERS", "LOCAL_STREAM", "FederatedSimulator"]

#: random stream of the clients' local minibatches
LOCAL_STREAM = 3

#: optimizers whose step acts element by element, so one optimizer over clients' stacked
#: parameters is the same as one optimizer per client
ELEMENTWISE_OPTIMIZERS: tuple[type, ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad,
    torch.optim.RMSprop, torch.optim.Adamax,
)

OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]


def _default_local(params: list[Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1)


class FederatedSimulator:
    """N federated clients in one process (module docstring for one round).

    Args:
        model: the global model (its parameters are what the server optimizer steps).
        loss_fn: ``loss_fn(output, target)`` → mean loss of a batch.
        clients: one ``(x, y)`` pair per client (every client needs at least one sample).
        algorithm: the client rule, :class:`~gradkit.federated.algorithms.FedAvg` (default),
            ``FedProx`` or ``FedSpeed``.
        local_optimizer: factory ``params -> Optimizer`` of each client's optimizer
            (default ``SGD(lr=0.1)``).
        local_steps: K, local steps per round (default 5).
        local_epochs: instead of K, passes over the client's data:
            K_i = epochs · ⌈n_i / batch_size⌉ (each step an independent minibatch).
        batch_size: local minibatch (None = the client's whole data every step).
        server_optimizer: factory ``params -> Optimizer`` on the pseudo-gradient
            (default ``SGD(lr=1)`` = FedAvg's averaging).
        aggregator: the server's rule on the rows (default Mean).
        participation: ``FullParticipation()`` (default), ``UniformSampling(m)`` or
            ``Bernoulli(p)``.
        weighting: ``"uniform"`` (mean over participants), ``"known"`` (1/p_n from the
            participation model, over N) or ``"fedau"`` (FedAU's online estimate, over N);
            a :class:`~gradkit.federated.participation.FedAUWeights` to set its cutoff.
        seed: the seed of every random choice (participation, minibatches).
        eval_data, metric_fn: evaluation data and an accuracy-like ``metric_fn(out, y)``.
        vectorize: ``True``/``False``/``"auto"`` (module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        clients: Sequence[tuple[Tensor, Tensor]],
        *,
        algorithm: FedAvg | None = None,
        local_optimizer: OptimizerFactory | None = None,
        local_steps: int = 5,
        local_epochs: int | None = None,
        batch_size: int | None = 32,
        server_optimizer: OptimizerFactory | None = None,
        aggregator: Aggregator | None = None,
        participation: Any = None,
        weighting: str | FedAUWeights = "uniform",
        seed: int = 0,
        eval_data: tuple[Tensor, Tensor] | None = None,
        metric_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        vectorize: bool | str = "auto",
    ):
        self.model, self.loss_fn = model, loss_fn
        self.clients = [(x, y) for x, y in clients]
        self.n = len(self.clients)
        if self.n == 0:
            raise ValueError("FederatedSimulator needs at least one client")
        empty = [i for i, (x, _) in enumerate(self.clients) if len(x) == 0]
        if empty:
            raise ValueError(f"FederatedSimulator: clients {empty} have no data; drop them or "
                             "repartition (gradkit.federated.partition gives every client "
                             "at least one sample)")
        self.algorithm = algorithm if algorithm is not None else FedAvg()
        self.local_optimizer = local_optimizer or _default_local
        V.check_count("FederatedSimulator", "local_steps", local_steps, minimum=1)
        if local_epochs is not None:
            V.check_count("FederatedSimulator", "local_epochs", local_epochs, minimum=1)
        self.local_steps, self.local_epochs = local_steps, local_epochs
        if batch_size is not None:
            V.check_count("FederatedSimulator", "batch_size", batch_size, minimum=1)
        self.batch_size = batch_size
        self.aggregator = aggregator if aggregator is not None else Mean()
        self.participation = participation if participation is not None else \
            FullParticipation()
        if isinstance(weighting, FedAUWeights):
            if weighting.n != self.n:
                raise ValueError(f"FederatedSimulator: FedAUWeights for {weighting.n} clients,"
                                 f" got {self.n}")
            self.fedau = weighting
        elif weighting == "fedau":
            self.fedau = FedAUWeights(self.n)
        elif weighting in ("uniform", "known"):
            self.fedau = None
            if weighting == "known" and getattr(self.participation, "probabilities",
                                                None) is None:
                raise ValueError("weighting='known' needs a participation model with "
                                 "probabilities (e.g. Bernoulli(p))")
        else:
            raise ValueError(f"Invalid weighting value: {weighting!r} ('uniform', 'known', "
                             "'fedau' or a FedAUWeights)")
        self.weighting = "fedau" if self.fedau is not None else weighting
        self.seed = seed
        self.eval_data, self.metric_fn = eval_data, metric_fn
        if vectorize not in (True, False, "auto"):
            raise ValueError(f"Invalid vectorize value: {vectorize!r} (True, False or 'auto')")
        self.vectorize = vectorize
        self.names = [k for k, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        factory = server_optimizer or (lambda ps: torch.optim.SGD(ps, lr=1.0))
        self.server_optimizer = factory(self.params)
        self.dim = sum(p.numel() for p in self.params)
        self.algorithm.init_state(self.n, self.dim, self.params[0].detach())
        self._loss = _functional_loss(model, loss_fn)
        self._grad_fn = self.algorithm.gradient_fn(self._loss)
        self.round = 0
        self.history = History()
        #: every client failure so far, as (round, client, reason)
        self.failures: list[tuple[int, int, str]] = []

    # ------------------------------------------------------------------ local training
    def steps_of(self, client: int) -> int:
        """K_i, the local steps of ``client`` per round."""
        if self.local_epochs is None:
            return self.local_steps
        n_i = len(self.clients[client][0])
        per_epoch = 1 if self.batch_size is None else math.ceil(n_i / self.batch_size)
        return self.local_epochs * per_epoch

    def _unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        out, offset = {}, 0
        lead = vector.shape[:-1]
        for name, p in zip(self.names, self.params):
            out[name] = vector[..., offset:offset + p.numel()].reshape(*lead, *p.shape)
            offset += p.numel()
        return out

    def _batches(self, clients: list[int], steps: int):
        """The minibatches of ``clients`` for each local step (per-client generators)."""
        gens = [worker_generator(self.seed, i, self.round, LOCAL_STREAM) for i in clients]
        for _ in range(steps):
            xs, ys = [], []
            for i, gen in zip(clients, gens):
                x, y = self.clients[i]
                idx = sample_batch(len(x), self.batch_size, gen)
                xs.append(x[idx])
                ys.append(y[idx])
            yield xs, ys

    def _train(self, clients: list[int], anchor: dict[str, Tensor], vectorized: bool
               ) -> tuple[Tensor, Tensor]:
        """Local training of ``clients`` (all with the same K); returns their (C, d)
        updates Δ and their first-step losses. One client when not vectorised."""
        buffers = {k: b.detach() for k, b in self.model.named_buffers()}
        state = self.algorithm.client_state(clients)
        C = len(clients)
        if vectorized:
            leaves = {k: v.unsqueeze(0).repeat(C, *([1] * v.dim())) for k, v in anchor.items()}
            state = self._unflatten(state) if state is not None else {}
            fn = vmap(self._grad_fn, in_dims=(0, None, 0, 0, None, 0))
        else:
            leaves = {k: v.clone() for k, v in anchor.items()}
            state = self._unflatten(state[0]) if state is not None else {}
            fn = self._grad_fn
        optimizer = self.local_optimizer(list(leaves.values()))
        first_loss = None
        for xs, ys in self._batches(clients, self.steps_of(clients[0])):
            x, y = (torch.stack(xs), torch.stack(ys)) if vectorized else (xs[0], ys[0])
            grads, loss = fn(leaves, buffers, x, y, anchor, state)
            for k, p in leaves.items():
                p.grad = grads[k]
            optimizer.step()
            if first_loss is None:
                first_loss = loss.detach().reshape(-1)
        delta = torch.cat([(leaves[k] - anchor[k]).reshape(C, -1) for k in leaves], dim=1)
        return delta, first_loss

    def _use_vmap(self) -> bool:
        if self.vectorize != "auto":
            return bool(self.vectorize)
        try:
            probe = self.local_optimizer([torch.zeros(1)])
        except Exception:
            return False
        return type(probe) in ELEMENTWISE_OPTIMIZERS

    def local_updates(self, clients: list[int]) -> tuple[dict[int, Tensor], dict[int, float],
                                                          dict[int, str]]:
        """Δ_i and first-step loss of each client that succeeded, and the failures
        ``{id: reason}`` (an exception, or a non-finite update)."""
        anchor = {k: p.detach().clone() for k, p in zip(self.names, self.params)}
        deltas: dict[int, Tensor] = {}
        losses: dict[int, float] = {}
        failed: dict[int, str] = {}
        groups: dict[tuple, list[int]] = {}
        for i in clients:
            shape = None if self.batch_size is not None else len(self.clients[i][0])
            groups.setdefault((self.steps_of(i), shape), []).append(i)
        if not self._use_vmap():
            for i in clients:
                self._train_one(i, anchor, deltas, losses, failed)
            return deltas, losses, failed
        for group in groups.values():
            try:
                D, L = self._train(group, anchor, vectorized=True)
            except Exception:
                # a client's data or model raised, or vmap cannot run this model: the loop
                # tells which; if every client trains there, vmap itself was the problem
                before = len(failed)
                for i in group:
                    self._train_one(i, anchor, deltas, losses, failed)
                if len(failed) == before:
                    if self.vectorize is True:
                        raise
                    self.vectorize = False
                continue
            for k, i in enumerate(group):
                self._accept(i, D[k], float(L[k]), deltas, losses, failed)
        return deltas, losses, failed

    def _train_one(self, i, anchor, deltas, losses, failed) -> None:
        try:
            D, L = self._train([i], anchor, vectorized=False)
        except Exception as error:
            failed[i] = f"{type(error).__name__}: {error}"
            return
        self._accept(i, D[0], float(L[0]), deltas, losses, failed)

    @staticmethod
    def _accept(i, delta, loss, deltas, losses, failed) -> None:
        if bool(torch.isfinite(delta).all()):
            deltas[i], losses[i] = delta, loss
        else:
            failed[i] = "non-finite update (NaN or inf)"

    # --------------------------------------------------------------------- one round
    def client_weights(self, participating: Tensor) -> Tensor:
        """(N,) weights ω of this round under the weighting rule (advances FedAU)."""
        if self.fedau is not None:
            return self.fedau.update(participating)
        if self.weighting == "known":
            p = self.participation.probabilities
            return (1.0 / p).expand(self.n).clone()
        return torch.ones(self.n, dtype=torch.float64)

    def step(self) -> dict[str, Any]:
        """One round (module docstring); returns its record."""
        self.model.train()
        mask = self.participation.sample(self.n, self.round, self.seed)
        selected = torch.nonzero(mask).flatten().tolist()
        deltas, losses, failed = self.local_updates(selected)
        self.failures.extend((self.round, i, why) for i, why in sorted(failed.items()))
        ok = sorted(deltas)
        observed = torch.zeros(self.n, dtype=torch.bool)
        observed[ok] = True
        omega = self.client_weights(observed)
        record: dict[str, Any] = {"round": self.round, "participants": ok, "failed": failed,
                                  "train_loss": (sum(losses.values()) / len(ok)) if ok
                                  else float("nan")}
        if ok:
            X = torch.stack([deltas[i] for i in ok])
            if self.weighting != "uniform":
                scale = omega[ok] * (len(ok) / self.n)
                X = X * scale.to(X.dtype).unsqueeze(1)
            update = self.aggregator(X)
            extra = self.algorithm.end_round(ok, torch.stack([deltas[i] for i in ok]))
            if extra is not None:
                update = update + extra
            self.server_optimizer.zero_grad(set_to_none=True)
            unflatten_into_grads(-update, self.params)
            self.server_optimizer.step()
        self.round += 1
        return record

    # evaluation and the run loop are the distributed simulator's own (same attributes:
    # model, loss_fn, eval_data, metric_fn, step, history)
    evaluate = Simulator.evaluate
    run = Simulator.run

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_workload(cls, workload: Any, n_clients: int, *, scheme: str = "iid",
                      alpha: float | None = None, beta: float | None = None, seed: int = 0,
                      split: str = "val", **kwargs: Any) -> FederatedSimulator:
        """A simulator on a gradkit array workload (e.g. ``DigitsMLP()``): model, loss and
        evaluation data from :func:`~gradkit.distributed.simulator.setup_workload`, the
        training split divided by :func:`~gradkit.federated.partition.partition`
        ``(scheme, alpha, beta, seed)``; ``kwargs`` go to the constructor."""
        setup = setup_workload(workload, n_clients, alpha=None, seed=seed, split=split)
        arrays = workload.arrays()
        parts = partition(arrays.y_train, n_clients, scheme, alpha=alpha, beta=beta,
                          seed=seed)
        clients = [(arrays.x_train[p], arrays.y_train[p]) for p in parts]
        return cls(setup.model, setup.loss_fn, clients, seed=seed,
                   eval_data=setup.eval_data, metric_fn=setup.metric_fn, **kwargs)
