r"""A Ray actor parameter server: straggler-tolerant rounds, robust aggregation, gradient coding.

``pip install 'gradkit[ray]'``. One *server* actor holds the model and the optimizer and owns
``n`` *worker* actors, each with its data. A round (:meth:`RayParameterServer.step`):

1. the server puts the current parameters in the object store and sends a task to every idle,
   live worker (a worker still busy with an older round is a straggler of this round too);
2. it collects results in arrival order with ``ray.wait(pending, num_returns=1, timeout=…)``
   and stops as soon as the round can finish:

   * **robust aggregation** (``aggregator=``): after ``wait_for`` results (default ``n``: a
     synchronous round) or when ``timeout`` seconds have passed. The rows are put in worker
     order, the Byzantine workers' rows are replaced by the attack computed from the honest rows
     (as in :class:`~gradkit.distributed.simulator.Simulator`), and the aggregator runs on the
     responders only. With ``wait_for = n`` and no faults a round is the simulator's round:
     every worker runs the simulator's :func:`~gradkit.distributed.simulator.worker_gradient`.
   * **gradient coding** (``code=``, a :class:`~gradkit.distributed.coding.GradientCode` for the
     ``n`` workers): worker ``i`` holds the shards of the partitions in its row of ``B`` and
     sends ``f_i = Σ_j B_ij h_j``, with ``h_j`` the gradient of partition ``j``'s minibatch
     divided by ``k`` (its minibatch keyed by ``j``, so any worker computing ``h_j`` computes the
     same one). The round ends as soon as the responders decode (at most the first ``n − s``),
     and ``Σ a_i f_i`` is the mean of the ``k`` partition gradients: the simulator's ``Mean``
     round, to rounding.

3. the aggregate is written into ``p.grad`` and the optimizer steps.

Stragglers are not waited for: they keep computing, and their late results are dropped (they
rejoin in the first round that finds them idle). A worker whose actor dies is reported with its
id (a warning and :attr:`RoundReport.crashed`) and never used again; the round goes on if the
remaining results still suffice (the aggregator's bound on the number of rows, or the code's
decodability), otherwise the round raises.

Faults can be injected for tests and demonstrations: ``delays`` (seconds a worker sleeps before
computing, per round and worker; e.g. ``ExponentialDelays(n).sample(rounds)``) and ``crashes``
(``{round: [worker ids]}``: those workers' processes exit in that round).

:func:`run_coded` runs any round-by-round coding scheme of :mod:`gradkit.distributed.coding`
(plain gradient coding, Selective-Repeat or Multiplexed Sequential Gradient Coding) on Ray actors
with injected delays: the Ray counterpart of :func:`~gradkit.distributed.coding.simulate_coded`.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gradkit.distributed._runtime_checks import check_byzantine
from gradkit.distributed.aggregators import Aggregator, Mean
from gradkit.distributed.coding import (
    CodedRun,
    CodingScheme,
    GradientCode,
    Task,
    UndecodableError,
    close_round,
)
from gradkit.distributed.simulator import round_matrix, unflatten_into_grads, worker_gradient
from gradkit.errors import require_extra

__all__ = ["RayParameterServer", "RoundReport", "connect", "run_coded"]

LossFn = Callable[[Tensor, Tensor], Tensor]
Delays = Tensor | Callable[[int, int], float] | None


def _ray() -> Any:
    return require_extra("ray", "ray", "The Ray runtime (gradkit.distributed.ray_runtime)")


def _reachable(address: str, timeout: float) -> None:
    """Raise ``ConnectionError`` unless something listens at ``host:port``."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return  # not host:port (e.g. "auto"): let ray.init say what is wrong
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ConnectionError(
            f"Could not reach a Ray cluster at {address!r} ({exc.strerror or exc}): start one "
            "with `ray start --head` and pass the address it prints, or call "
            "connect() without an address for a local instance"
        ) from exc


def connect(address: str | None = None, *, timeout: float = 5.0, **init_kwargs: Any) -> None:
    """Connect to a Ray cluster (``address``) or start a local instance (``None``).

    An address where nothing listens is refused within ``timeout`` seconds with a
    ``ConnectionError`` saying what to do (``ray.init`` itself would retry for minutes); then,
    if Ray is already initialised, nothing else happens. A new local instance puts the
    directory this ``gradkit`` was imported from on the actors' ``PYTHONPATH``, so they run the
    same code as the driver. ``init_kwargs`` go to ``ray.init`` (e.g. ``num_cpus=2``).

    Raises:
        MissingExtraError: Ray is not installed (``pip install 'gradkit[ray]'``).
        ConnectionError: the cluster cannot be reached.
    """
    ray = _ray()
    if address is not None:
        _reachable(address, timeout)
    if ray.is_initialized():
        return
    init_kwargs.setdefault("log_to_driver", False)
    if address is None and "runtime_env" not in init_kwargs:
        # the actors must import the same gradkit as this process (e.g. a source checkout)
        src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
        init_kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
    try:
        ray.init(address=address, **init_kwargs)
    except ConnectionError as exc:
        raise ConnectionError(
            f"Could not connect to a Ray cluster at {address!r}: {exc}. Start one with "
            "`ray start --head`, or call connect() without an address for a local instance"
        ) from exc


@dataclass
class RoundReport:
    """What happened in one round of :class:`RayParameterServer`."""

    round: int
    #: workers whose results were used, in arrival order
    responders: list[int]
    #: live workers the round did not wait for (slow, or still busy with an older round)
    stragglers: list[int]
    #: workers whose actor died during this round
    crashed: list[int] = field(default_factory=list)
    #: mean minibatch loss reported by the honest responders (NaN for coded rounds)
    loss: float = float("nan")
    #: wall time of the round, seconds
    seconds: float = 0.0


# ------------------------------------------------------------------------------ actors
class _Worker:
    """One worker: its data and the model's structure (parameters come with each task)."""

    def __init__(self, worker: int, model_fn: Callable[[], nn.Module], loss_fn: LossFn,
                 data: Mapping[int, tuple[Tensor, Tensor]], seed: int,
                 batch_size: int | None) -> None:
        torch.set_num_threads(1)
        self.worker, self.model, self.loss_fn = worker, model_fn(), loss_fn
        self.data, self.seed, self.batch_size = dict(data), seed, batch_size

    def _fault(self, delay: float, crash: bool) -> None:
        if crash:
            os._exit(1)  # a real crash of this actor's process
        if delay > 0:
            time.sleep(delay)

    def _gradient(self, key: int, params: dict[str, Tensor], round: int) -> tuple[Tensor, Tensor]:
        x, y = self.data[key]
        return worker_gradient(self.model, x, y, self.loss_fn, worker=key, round=round,
                               seed=self.seed, batch_size=self.batch_size, params=params)

    def gradient(self, params: dict[str, Tensor], round: int, delay: float = 0.0,
                 crash: bool = False) -> tuple[Tensor, float]:
        """The simulator's minibatch gradient of this worker, and its loss."""
        self._fault(delay, crash)
        g, loss = self._gradient(self.worker, params, round)
        return g, float(loss)

    def coded(self, params: dict[str, Tensor], round: int, partitions: Sequence[int],
              weights: Sequence[float], k: int, delay: float = 0.0,
              crash: bool = False) -> Tensor:
        """``Σ_j weights[j] · h_j`` with ``h_j`` partition j's minibatch gradient over ``k``."""
        self._fault(delay, crash)
        out = None
        for p, w in zip(partitions, weights):
            term = self._gradient(p, params, round)[0] * (w / k)
            out = term if out is None else out + term
        return out

    def ready(self) -> bool:
        return True


class _Server:
    """The parameter server actor (see the module docstring)."""

    def __init__(self, model_fn, loss_fn, shards, aggregator, optimizer_fn, byzantine, attack,
                 code, batch_size, seed, wait_for, timeout, delays, crashes) -> None:
        ray = _ray()
        torch.set_num_threads(1)
        self.model = model_fn()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = optimizer_fn(self.params)
        self.n = len(shards)
        self.aggregator, self.byzantine, self.attack = aggregator, list(byzantine), attack
        self.code, self.seed = code, seed
        self.wait_for, self.timeout = wait_for, timeout
        self.delays, self.crashes = delays, {int(r): set(w) for r, w in (crashes or {}).items()}
        worker_cls = ray.remote(_Worker).options(num_cpus=0, max_restarts=0)
        self.workers = []
        for i in range(self.n):
            keys = code.partitions(i) if code is not None else [i]
            data = {j: shards[j] for j in keys}
            self.workers.append(worker_cls.remote(i, model_fn, loss_fn, data, seed, batch_size))
        ray.get([w.ready.remote() for w in self.workers])
        self.alive = set(range(self.n))
        self.busy: dict[int, Any] = {}  # worker -> its unfinished task
        self.round = 0

    def ready(self) -> bool:
        return True

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _dispatch(self, worker: int, params_ref: Any) -> Any:
        handle = self.workers[worker]
        delay = _delay_of(self.delays, self.round, worker)
        crash = worker in self.crashes.get(self.round, ())
        if self.code is None:
            return handle.gradient.remote(params_ref, self.round, delay, crash)
        parts = self.code.partitions(worker)
        weights = [float(self.code.B[worker, p]) for p in parts]
        return handle.coded.remote(params_ref, self.round, parts, weights, self.code.k, delay,
                                   crash)

    def _reap(self, ray: Any) -> list[int]:
        """Free the workers whose older tasks finished (results dropped); return the dead."""
        dead = []
        if not self.busy:
            return dead
        done, _ = ray.wait(list(self.busy.values()), num_returns=len(self.busy), timeout=0)
        owner = {ref: i for i, ref in self.busy.items()}
        for ref in done:
            i = owner[ref]
            del self.busy[i]
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                dead.append(i)
        return dead

    def _mark_dead(self, worker: int, crashed: list[int]) -> None:
        self.alive.discard(worker)
        crashed.append(worker)  # the driver's step() warns with the worker id

    def _done(self, arrived: list[tuple[int, Any]]) -> bool:
        if self.code is None:
            return len(arrived) >= self.wait_for
        try:
            self.code.decode([i for i, _ in arrived])
        except UndecodableError:
            return False
        return True

    def step(self) -> RoundReport:
        ray = _ray()
        start = time.monotonic()
        crashed: list[int] = []
        for i in self._reap(ray):
            self._mark_dead(i, crashed)
        params = {k: p.detach().clone() for k, p in self.model.named_parameters()
                  if p.requires_grad}
        params_ref = ray.put(params)
        late = sorted(i for i in self.alive if i in self.busy)
        owner = {}
        for i in sorted(self.alive - set(self.busy)):
            ref = self._dispatch(i, params_ref)
            owner[ref] = i
            self.busy[i] = ref
        pending = list(owner)
        arrived: list[tuple[int, Any]] = []
        deadline = None if self.timeout is None or self.code is not None else (
            start + self.timeout)
        while not self._done(arrived):
            if not pending:
                if self.code is None or not any(i in self.busy for i in late):
                    break
                # a coded round cannot finish without a worker still busy with an older
                # round: wait for it, drop that stale result, give it this round's task
                waiting = {self.busy[i]: i for i in late if i in self.busy}
                ready, _ = ray.wait(list(waiting), num_returns=1)
                i = waiting[ready[0]]
                del self.busy[i]
                try:
                    ray.get(ready[0])
                except ray.exceptions.RayActorError:
                    self._mark_dead(i, crashed)
                    continue
                ref = self._dispatch(i, params_ref)
                owner[ref] = i
                self.busy[i] = ref
                pending.append(ref)
                continue
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                break  # timeout: go on with what arrived
            i = owner[ready[0]]
            del self.busy[i]
            try:
                arrived.append((i, ray.get(ready[0])))
            except ray.exceptions.RayActorError:
                self._mark_dead(i, crashed)
        responders = [i for i, _ in arrived]
        stragglers = sorted((set(late) | {owner[r] for r in pending}) - set(responders)
                            - set(crashed))
        if self.code is not None:
            g = self._decode(arrived, crashed)
            loss = float("nan")
        else:
            g, loss = self._aggregate(arrived, crashed)
        self.optimizer.zero_grad(set_to_none=True)
        unflatten_into_grads(g, self.params)
        self.optimizer.step()
        report = RoundReport(self.round, responders, stragglers, crashed, loss,
                             time.monotonic() - start)
        self.round += 1
        return report

    def _decode(self, arrived, crashed) -> Tensor:
        try:
            a = self.code.decode([i for i, _ in arrived])
        except UndecodableError as exc:
            raise UndecodableError(
                f"round {self.round}: the results of workers {[i for i, _ in arrived]} do not "
                f"decode (crashed: {crashed}, dead: {sorted(set(range(self.n)) - self.alive)})"
                f": {exc}"
            ) from exc
        out = None
        for i, f in arrived:
            if a[i] != 0:
                term = f * a[i].item()
                out = term if out is None else out + term
        return out

    def _aggregate(self, arrived, crashed) -> tuple[Tensor, float]:
        rows = sorted(arrived, key=lambda row: row[0])
        ids = [i for i, _ in rows]
        byz = [k for k, i in enumerate(ids) if i in self.byzantine]
        honest = [k for k, i in enumerate(ids) if i not in self.byzantine]
        if not honest:
            raise RuntimeError(
                f"round {self.round}: no honest worker answered (responders {ids}, crashed "
                f"{crashed}); raise the timeout or wait_for"
            )
        H = torch.stack([rows[k][1][0] for k in honest])
        X = round_matrix(H, honest, byz, self.attack, seed=self.seed, round=self.round)
        try:
            g = self.aggregator(X)
        except ValueError as exc:
            raise ValueError(
                f"round {self.round}: {len(ids)} of {self.n} workers answered ({ids}; crashed "
                f"{crashed}) and the aggregator cannot run on them: {exc}"
            ) from exc
        loss = sum(rows[k][1][1] for k in honest) / len(honest)
        return g, loss

    def shutdown(self) -> None:
        ray = _ray()
        for w in self.workers:
            ray.kill(w)


# ------------------------------------------------------------------------------ driver
class RayParameterServer:
    """Driver-side handle of the parameter-server actor.

    Args:
        model_fn: builds the model (called on the server and on every worker; it must give the
            same initial parameters each time, e.g. by seeding inside).
        loss_fn: ``loss_fn(output, target)`` → mean loss of a batch.
        shards: one ``(x, y)`` pair per worker (``n = len(shards)``); with ``code``, one per
            data partition (``k = n`` partitions for the repetition codes).
        aggregator: the robust rule (default ``Mean()``); not used with ``code``.
        optimizer: ``params -> torch.optim.Optimizer`` (default ``SGD(lr=0.1)``).
        byzantine: worker ids whose vectors are replaced by ``attack``.
        attack: a :mod:`gradkit.distributed.attacks` attack (needed with ``byzantine``).
        code: a :class:`~gradkit.distributed.coding.GradientCode` over the ``n`` workers: the
            round decodes the exact mean gradient from the first responders.
        batch_size: minibatch per worker (or partition) and round (None: the whole shard).
        seed: seed of the minibatches and of the attack's randomness (as the simulator's).
        wait_for: results to wait for in a robust round (default ``n``).
        timeout: seconds a robust round waits at most (default: no limit).
        delays: injected delays, a ``(rounds, n)`` tensor or ``(round, worker) -> seconds``.
        crashes: injected crashes, ``{round: [worker ids]}``.
        address: Ray cluster address (default: the current one, or a new local instance).
    """

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        loss_fn: LossFn,
        shards: Sequence[tuple[Tensor, Tensor]],
        aggregator: Aggregator | None = None,
        *,
        optimizer: Callable[[list[Tensor]], torch.optim.Optimizer] | None = None,
        byzantine: Sequence[int] = (),
        attack: Any = None,
        code: GradientCode | None = None,
        batch_size: int | None = 32,
        seed: int = 0,
        wait_for: int | None = None,
        timeout: float | None = None,
        delays: Delays = None,
        crashes: Mapping[int, Sequence[int]] | None = None,
        address: str | None = None,
    ) -> None:
        n = len(shards)
        if n == 0:
            raise ValueError("RayParameterServer needs at least one worker shard")
        byzantine = check_byzantine("RayParameterServer", byzantine, attack, n)
        if code is not None:
            if aggregator is not None or byzantine:
                raise ValueError("gradient coding decodes the exact mean of honest workers: "
                                 "do not combine code= with an aggregator or Byzantine workers")
            if code.n != n or code.k != n:
                raise ValueError(f"the code is for n = {code.n} workers and k = {code.k} "
                                 f"partitions, but {n} shards were given")
        if wait_for is None:
            wait_for = n
        if isinstance(wait_for, bool) or not isinstance(wait_for, int) or not 1 <= wait_for <= n:
            raise ValueError(f"Invalid wait_for value: {wait_for!r} (must be in 1..{n})")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"Invalid timeout value: {timeout} (must be a positive number)")
        if isinstance(delays, Tensor) and (delays.dim() != 2 or delays.shape[1] != n):
            raise ValueError(f"delays must be a (rounds, {n}) tensor, got {tuple(delays.shape)}")
        ray = _ray()
        connect(address)
        if optimizer is None:
            def optimizer(params):
                return torch.optim.SGD(params, lr=0.1)
        server_cls = ray.remote(_Server).options(num_cpus=0, max_restarts=0)
        self._server = server_cls.remote(
            model_fn, loss_fn, list(shards), aggregator if aggregator is not None else Mean(),
            optimizer, byzantine, attack, code, batch_size, seed, wait_for, timeout, delays,
            crashes,
        )
        ray.get(self._server.ready.remote())  # surfaces construction errors here
        self.n = n

    def step(self) -> RoundReport:
        """Run one round on the server; returns its report (crashed workers also warn)."""
        report = _ray().get(self._server.step.remote())
        for i in report.crashed:
            warnings.warn(f"Ray worker {i} crashed in round {report.round} and is dropped",
                          stacklevel=2)
        return report

    def run(self, rounds: int) -> list[RoundReport]:
        """Run ``rounds`` rounds; returns their reports."""
        return [self.step() for _ in range(rounds)]

    def state_dict(self) -> dict[str, Tensor]:
        """The server model's current ``state_dict``."""
        return _ray().get(self._server.state_dict.remote())

    def shutdown(self) -> None:
        """Kill the worker actors and the server actor (Ray itself stays up)."""
        ray = _ray()
        try:
            ray.get(self._server.shutdown.remote())
        finally:
            ray.kill(self._server)

    def __enter__(self) -> RayParameterServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


# ------------------------------------------------------------------ sequential coding on Ray
class _TaskWorker:
    """Evaluates a coding scheme's tasks with a user function ``(job, partition) -> Tensor``."""

    def __init__(self, partial_gradient: Callable[[int, int], Tensor]) -> None:
        torch.set_num_threads(1)
        self.partial_gradient = partial_gradient

    def run(self, tasks: Sequence[Task | None], delay: float = 0.0) -> list[Tensor | None]:
        if delay > 0:
            time.sleep(delay)
        return [None if t is None else t.compute(self.partial_gradient) for t in tasks]

    def ready(self) -> bool:
        return True


def run_coded(
    scheme: CodingScheme,
    partial_gradient: Callable[[int, int], Tensor],
    *,
    delays: Delays = None,
    mu: float = 0.5,
    address: str | None = None,
) -> CodedRun:
    """Run a coding scheme (:mod:`gradkit.distributed.coding`) on ``scheme.n`` Ray actors.

    The Ray counterpart of :func:`~gradkit.distributed.coding.simulate_coded`: round ``r``
    sends every worker its ``scheme.tasks(r)`` (each actor evaluates them with
    ``partial_gradient``, after sleeping its injected delay), waits for the first result, and
    then until ``(1 + mu)`` times that first response time; the workers still missing are
    the round's stragglers if ``scheme.admits`` them, otherwise the round waits for everyone
    (the SGC authors' rule). Job ``r − T`` is decoded at the end of round ``r``. A straggler
    keeps computing: its late result is dropped, and its next tasks queue behind it.

    Args:
        scheme: a fresh scheme with a finite number of jobs.
        partial_gradient: ``(job, partition) -> Tensor``; sent to the actors (picklable).
        delays: injected delays, a ``(rounds, n)`` tensor or ``(round, worker) -> seconds``.
        mu: the patience factor of the straggler rule (``mu >= 0``).
        address: Ray cluster address (default: the current one, or a new local instance).

    Returns:
        A :class:`~gradkit.distributed.coding.CodedRun`: the decoded gradients, the stragglers
        actually gone on without, the rounds that waited for all, and the wall time per round.
    """
    if scheme.rounds:
        raise ValueError("run_coded needs a fresh scheme (no round recorded yet)")
    if not mu >= 0:
        raise ValueError(f"Invalid mu value: {mu} (must be >= 0)")
    ray = _ray()
    connect(address)
    n, rounds = scheme.n, scheme.total_rounds
    worker_cls = ray.remote(_TaskWorker).options(num_cpus=0, max_restarts=0)
    workers = [worker_cls.remote(partial_gradient) for _ in range(n)]
    try:
        ray.get([w.ready.remote() for w in workers])
        results: dict[tuple[int, int, int], Tensor] = {}
        grads, effective, waited, durations = [], [], [], []
        for r in range(rounds):
            tasks = scheme.tasks(r)
            start = time.monotonic()
            owner = {}
            for i in range(n):
                if any(t is not None for t in tasks[i]):
                    owner[workers[i].run.remote(tasks[i], _delay_of(delays, r, i))] = i
            pending, got = list(owner), {}
            if pending:
                ready, pending = ray.wait(pending, num_returns=1)
                got[owner[ready[0]]] = ray.get(ready[0])
                deadline = start + (1.0 + mu) * (time.monotonic() - start)
                while pending:
                    left = deadline - time.monotonic()
                    ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, left))
                    if not ready:
                        break
                    got[owner[ready[0]]] = ray.get(ready[0])
            late = torch.zeros(n, dtype=torch.bool)
            late[[owner[ref] for ref in pending]] = True
            if late.any() and not scheme.admits(late):
                waited.append(r)
                for ref in pending:
                    got[owner[ref]] = ray.get(ref)
                late[:] = False
            durations.append(time.monotonic() - start)
            for i, outs in got.items():
                for m, out in enumerate(outs):
                    if out is not None:
                        results[(r, i, m)] = out
            effective.append(late)
            grad = close_round(scheme, r, late, results)
            if grad is not None:
                grads.append(grad)
        return CodedRun(grads, torch.stack(effective), waited,
                        torch.tensor(durations, dtype=torch.float64))
    finally:
        for w in workers:
            ray.kill(w)


def _delay_of(delays: Delays, round: int, worker: int) -> float:
    if delays is None:
        return 0.0
    if callable(delays):
        return float(delays(round, worker))
    return float(delays[round, worker]) if round < delays.shape[0] else 0.0
