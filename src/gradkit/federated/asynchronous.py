r"""Asynchronous federated aggregation with delays: Async, FedFix and FedBuff.

Fraboni, Vidal, Kameni & Lorenzi, "A General Theory for Federated Optimization with
Asynchronous and Heterogeneous Clients Updates" (arXiv 2206.10189); reference code
``Accenture/Labs-Federated-Learning`` (async branch: ``FL/server.py``,
``FL/clients_schedule.py``). Clients work on the model they last received; with ρ_i(n) the
delay of client i's contribution at server step n::

    θ^{n+1} = θ^n + η_g Σ_{i ∈ S_n} d_i · ( θ_i^{local}(θ^{n−ρ_i(n)}) − θ^{n−ρ_i(n)} )

and every participant of step n receives θ^{n+1} right after it. The method optimises
Σ_i q_i L_i with q_i ∝ E[d_i·1(i ∈ S_n)], so d_i are chosen to make q the desired
importances p. Who aggregates at step n (:func:`schedule`), with client i's job taking τ_i:

=========  ==========================================================================
FL         everyone; a step lasts max τ (synchronous FedAvg), d_i = p_i
Async      the single earliest-returning client (ties: lowest index); the step happens at
           its return time; d_i = (Σ_j 1/τ_j)·τ_i·p_i (``"weight"``) or 1 (``"identical"``)
FedFix-Δt  everyone returned by (n+1)·Δt (a step with no return is a no-op);
           d_i = ⌈τ_i/Δt⌉·p_i
FedBuff-c  the c earliest-returning clients; the step happens at the c-th return;
           d_i = p_i / (fraction of steps in which i takes part) (``"weight"``, oracle
           knowledge of the whole schedule, as the reference) or 1/c (``"identical"``)
=========  ==========================================================================

A client restarts at the time of the step that aggregated it. The schedule is the table
``M[n, i]`` = index of the model client i's contribution at step n was computed from, −1
if i is absent; steps run while their time is ≤ T. Choices: the time model is pluggable
(constant τ_i as the reference, or any ``duration(i, job)``, e.g. exponential draws); FedBuff
allows c = M (the reference's ``argpartition`` fails there), which is FL with d = 1/M; for
an online (non-oracle) FedBuff weight use
:class:`~gradkit.federated.participation.FedAUWeights` on the schedule's participation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from gradkit.distributed import _validation as V
from gradkit.distributed.simulator import unflatten_into_grads
from gradkit.federated.simulator import FederatedSimulator

__all__ = ["SCHEMES", "async_weights", "client_times", "run_schedule", "schedule"]

SCHEMES = ("fl", "async", "fedfix", "fedbuff")

Duration = Callable[[int, int], float]


def client_times(n_clients: int, slowdown_percent: float) -> Tensor:
    """The reference's scenario "F-P": τ_i = 1 − i·(P/100)/(M − 1), client 0 the slowest."""
    V.check_count("client_times", "n_clients", n_clients, minimum=1)
    if not 0 <= slowdown_percent < 100:
        raise ValueError(f"Invalid slowdown_percent value: {slowdown_percent} (in [0, 100))")
    if n_clients == 1:
        return torch.ones(1, dtype=torch.float64)
    i = torch.arange(n_clients, dtype=torch.float64)
    return 1 - i * (slowdown_percent / 100) / (n_clients - 1)


def _durations(tau: Sequence[float] | Tensor | Duration, n: int | None) -> tuple[Duration, int]:
    if callable(tau):
        if n is None:
            raise ValueError("schedule: a duration function needs n_clients=")
        return tau, n
    t = torch.as_tensor(tau, dtype=torch.float64).reshape(-1)
    if t.numel() == 0 or not bool((t > 0).all()):
        raise ValueError(f"Invalid client times: {t.tolist()} (each must be > 0)")
    return (lambda i, job: float(t[i])), t.numel()


def schedule(scheme: str, tau: Sequence[float] | Tensor | Duration, horizon: float, *,
             dt: float | None = None, c: int | None = None, n_clients: int | None = None
             ) -> Tensor:
    """The (steps, M) table of model indices (−1 = absent) of ``scheme`` up to time T.

    Args:
        scheme: "fl", "async", "fedfix" (needs ``dt``) or "fedbuff" (needs ``c``).
        tau: the clients' constant job times τ_i, or ``duration(i, job) -> float`` (with
            ``n_clients``) for random or changing times.
        horizon: T, the simulated time; steps happen while their time is ≤ T.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"Invalid scheme: {scheme!r} (one of {', '.join(SCHEMES)})")
    duration, m = _durations(tau, n_clients)
    horizon = V.check_real("schedule", "horizon", horizon, positive=True)
    if scheme == "fedfix":
        if dt is None:
            raise ValueError("schedule: 'fedfix' needs dt=")
        dt = V.check_real("schedule", "dt", dt, positive=True)
    if scheme == "fedbuff":
        if c is None:
            raise ValueError("schedule: 'fedbuff' needs c=")
        V.check_count("schedule", "c", c, minimum=1)
        if c > m:
            raise ValueError(f"Invalid c value: {c} (FedBuff needs c <= {m} clients)")
    if scheme == "fl":
        scheme, c = "fedbuff", m
    if scheme == "async":
        scheme, c = "fedbuff", 1
    jobs = [0] * m
    back = [duration(i, 0) for i in range(m)]   # return time of each client's current job
    model = [0] * m                              # the model index it works on
    rows: list[list[int]] = []
    eps = 1e-12
    while True:
        n = len(rows)
        if scheme == "fedfix":
            now = (n + 1) * dt
            chosen = [i for i in range(m) if back[i] <= now + eps]
        else:
            order = sorted(range(m), key=lambda i: (back[i], i))[:c]
            now = max(back[i] for i in order)
            chosen = sorted(order)
        if now > horizon + eps:
            break
        rows.append([model[i] if i in chosen else -1 for i in range(m)])
        for i in chosen:
            jobs[i] += 1
            model[i] = n + 1
            back[i] = now + duration(i, jobs[i])
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), m)


def async_weights(scheme: str, tau: Sequence[float] | Tensor, p: Sequence[float] | Tensor,
                  *, mode: str = "weight", dt: float | None = None, c: int | None = None,
                  table: Tensor | None = None) -> Tensor:
    """The aggregation weights d_i of ``scheme`` (module docstring table).

    Args:
        scheme, tau: as :func:`schedule` (constant τ_i).
        p: the desired importances (e.g. uniform 1/M).
        mode: ``"weight"`` or ``"identical"`` (Async and FedBuff).
        table: FedBuff ``"weight"``: the schedule whose participation frequencies it uses.
    """
    t = torch.as_tensor(tau, dtype=torch.float64).reshape(-1)
    q = torch.as_tensor(p, dtype=torch.float64).reshape(-1)
    if mode not in ("weight", "identical"):
        raise ValueError(f"Invalid mode value: {mode!r} ('weight' or 'identical')")
    if scheme == "fl":
        return q.clone()
    if scheme == "async":
        return (1 / t).sum() * t * q if mode == "weight" else torch.ones_like(q)
    if scheme == "fedfix":
        if dt is None:
            raise ValueError("async_weights: 'fedfix' needs dt=")
        return torch.tensor([math.ceil(float(x) / dt - 1e-12) for x in t],
                            dtype=torch.float64) * q
    if scheme == "fedbuff":
        if mode == "identical":
            if c is None:
                raise ValueError("async_weights: 'fedbuff' with mode='identical' needs c=")
            return torch.full_like(q, 1.0 / c)
        if table is None:
            raise ValueError("async_weights: 'fedbuff' with mode='weight' needs table= "
                             "(its participation frequencies)")
        freq = (table >= 0).double().mean(dim=0)
        return torch.where(freq > 0, q / freq.clamp(min=1e-300), torch.zeros_like(q))
    raise ValueError(f"Invalid scheme: {scheme!r} (one of {', '.join(SCHEMES)})")


def run_schedule(sim: FederatedSimulator, table: Tensor, weights: Tensor,
                 eval_every: int = 1) -> list[dict[str, Any]]:
    """Train ``sim`` along an asynchronous ``table`` with weights d (the rule above).

    Step n uses, for each participant i, ``sim``'s local training started from
    θ^{table[n, i]} (minibatches drawn as in round n); the server optimizer steps on
    −Σ_i d_i Δ_i (``SGD(lr=η_g)`` = the rule). The client rule must keep no server state
    (FedAvg, FedProx). Failures are excluded and reported as in synchronous rounds.
    Returns the per-step records (with ``eval_loss``/``accuracy`` every ``eval_every``).
    """
    if sim.algorithm.needs_state:
        raise ValueError(f"run_schedule: {sim.algorithm!r} keeps per-client server state; "
                         "use FedAvg or FedProx for asynchronous runs")
    if table.dim() != 2 or table.shape[1] != sim.n:
        raise ValueError(f"run_schedule: table of shape {tuple(table.shape)} for {sim.n} "
                         "clients")
    d = torch.as_tensor(weights, dtype=torch.float64)
    models = {0: [p.detach().clone() for p in sim.params]}
    last_use = {int(k): n for n, row in enumerate(table.tolist()) for k in row if k >= 0}
    records = []
    for n, row in enumerate(table.tolist()):
        sim.round = n
        deltas, losses, failed = {}, {}, {}
        for i, k in enumerate(row):
            if k < 0:
                continue
            anchor = dict(zip(sim.names, models[k]))
            sim._train_one(i, anchor, deltas, losses, failed)
        sim.failures.extend((n, i, why) for i, why in sorted(failed.items()))
        ok = sorted(deltas)
        if ok:
            update = sum(float(d[i]) * deltas[i] for i in ok)
            sim.server_optimizer.zero_grad(set_to_none=True)
            unflatten_into_grads(-update, sim.params)
            sim.server_optimizer.step()
        models[n + 1] = [p.detach().clone() for p in sim.params]
        for k in [k for k in models if last_use.get(k, -1) <= n and k != n + 1]:
            del models[k]
        record: dict[str, Any] = {"round": n, "participants": ok, "failed": failed,
                                  "train_loss": sum(losses.values()) / len(ok) if ok
                                  else float("nan")}
        if (n + 1) % eval_every == 0 or n == len(table) - 1:
            record.update(sim.evaluate())
        records.append(record)
    sim.round = len(table)
    return records
