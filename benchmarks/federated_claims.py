"""Federated claims at small scale, on the digits MLP (``gradkit.bench.workloads.DigitsMLP``).

Two tables from one run, each cell the mean over ``--seeds`` seeds (partition, initial model,
participation and minibatches all follow the seed), evaluated on the digits test split:

1. FedAU (Wang & Ji, ICLR 2024) vs FedAvg under heterogeneous, *unknown* participation.
   N = 40 clients, Dirichlet(0.1) label skew; a client whose most frequent label is in
   0–4 participates with probability 0.5 each round, the others with 0.05 (Bernoulli).
   FedAvg averages over the participants (biased towards the frequent clients' labels);
   FedAU weights each update by its online estimate of 1/p_n, over N; "known 1/p" is the
   oracle with the true probabilities. 5 local SGD steps (lr 0.1, batch 16), server SGD
   lr 1. Columns: final test accuracy (mean of the last 3 evaluations, every 20 rounds)
   and the final accuracy on the rare clients' classes 5–9.
2. FedSpeed (Sun et al., ICLR 2023) vs FedAvg / FedProx with many local steps.
   N = 20 clients, Dirichlet(0.3), Bernoulli(0.5) participation, K = 20 local SGD steps
   (lr 0.05, batch 16); FedProx μ = 0.1; FedSpeed ρ = 0.05, c = 0.1. Column: the first
   round (evaluated every 2 rounds) reaching the target test accuracy, and the final
   accuracy.

3. Simulator throughput: FedAvg rounds per second with local training vectorised over
   clients (``torch.func.vmap``, one SGD over the stacked parameters) vs the per-client
   loop, 50 clients × 5 local steps (batch 16), full participation, one thread; the
   maximum parameter difference between the two paths is printed with it.

    PYTHONPATH=src .venv/bin/python benchmarks/federated_claims.py [--seeds 3] [--rounds 300]
"""

from __future__ import annotations

import argparse
import time

import torch

from gradkit.bench.workloads import DigitsMLP
from gradkit.federated.algorithms import FedAvg, FedProx, FedSpeed
from gradkit.federated.participation import Bernoulli
from gradkit.federated.partition import partition
from gradkit.federated.simulator import FederatedSimulator


def _sgd(lr: float):
    return lambda params: torch.optim.SGD(params, lr=lr)


def _class_accuracy(sim: FederatedSimulator, classes: range) -> float:
    x, y = sim.eval_data
    keep = (y >= classes.start) & (y < classes.stop)
    with torch.no_grad():
        return float((sim.model(x[keep]).argmax(1) == y[keep]).float().mean())


def fedau_table(seeds: int, rounds: int) -> list[tuple[str, float, float]]:
    workload = DigitsMLP()
    y_train = workload.arrays().y_train
    rows = []
    for name, weighting in [("FedAvg", "uniform"), ("FedAU", "fedau"),
                            ("known 1/p", "known")]:
        finals, rare = [], []
        for seed in range(seeds):
            parts = partition(y_train, 40, "dirichlet", alpha=0.1, seed=seed)
            dominant = torch.stack([torch.bincount(y_train[p], minlength=10).argmax()
                                    for p in parts])
            p = torch.where(dominant < 5, 0.5, 0.05).double()
            sim = FederatedSimulator.from_workload(
                workload, 40, scheme="dirichlet", alpha=0.1, seed=seed, split="test",
                participation=Bernoulli(p), weighting=weighting, local_steps=5,
                batch_size=16, local_optimizer=_sgd(0.1))
            history = sim.run(rounds, eval_every=20)
            finals.append(sum([a for a in history.accuracy if a == a][-3:]) / 3)
            rare.append(_class_accuracy(sim, range(5, 10)))
        rows.append((name, sum(finals) / seeds, sum(rare) / seeds))
    return rows


def fedspeed_table(seeds: int, rounds: int, target: float
                   ) -> list[tuple[str, float, float]]:
    workload = DigitsMLP()
    rows = []
    for name, algorithm in [("FedAvg", FedAvg), ("FedProx", lambda: FedProx(mu=0.1)),
                            ("FedSpeed", lambda: FedSpeed(rho=0.05, lamb=0.1))]:
        hits, finals = [], []
        for seed in range(seeds):
            sim = FederatedSimulator.from_workload(
                workload, 20, scheme="dirichlet", alpha=0.3, seed=seed, split="test",
                participation=Bernoulli(0.5), algorithm=algorithm(), local_steps=20,
                batch_size=16, local_optimizer=_sgd(0.05))
            history = sim.run(rounds, eval_every=2)
            reached = [r + 1 for r, a in zip(history.rounds, history.accuracy)
                       if a == a and a >= target]
            hits.append(reached[0] if reached else float("inf"))
            finals.append(history.final_accuracy)
        rows.append((name, sum(hits) / seeds, sum(finals) / seeds))
    return rows


def throughput(rounds: int = 10) -> tuple[float, float, float]:
    """Rounds per second of the vmap path and of the loop, and their max parameter gap."""
    rates, finals = [], []
    for vectorize in (True, False):
        sim = FederatedSimulator.from_workload(DigitsMLP(), 50, seed=0, local_steps=5,
                                               batch_size=16, vectorize=vectorize)
        sim.run(1)  # warm-up
        start = time.perf_counter()
        sim.run(rounds)
        rates.append(rounds / (time.perf_counter() - start))
        finals.append(torch.cat([p.detach().reshape(-1) for p in sim.model.parameters()]))
    return rates[0], rates[1], float((finals[0] - finals[1]).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=300, help="rounds of the FedAU table")
    parser.add_argument("--speed-rounds", type=int, default=60)
    parser.add_argument("--target", type=float, default=0.9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    print(f"FedAU vs FedAvg, heterogeneous unknown participation (digits MLP, N=40, "
          f"Dir(0.1), p in {{0.5, 0.05}}, {args.rounds} rounds, {args.seeds} seeds)")
    print(f"{'method':<12}{'test acc':>10}{'acc 5-9':>10}")
    for name, acc, rare in fedau_table(args.seeds, args.rounds):
        print(f"{name:<12}{acc:>10.3f}{rare:>10.3f}")
    print(f"\nrounds to {args.target:.0%} test accuracy, K=20 local steps (digits MLP, N=20, "
          f"Dir(0.3), Bernoulli(0.5), {args.speed_rounds} rounds, {args.seeds} seeds)")
    print(f"{'method':<12}{'rounds':>10}{'final acc':>10}")
    for name, hit, final in fedspeed_table(args.seeds, args.speed_rounds, args.target):
        print(f"{name:<12}{hit:>10.1f}{final:>10.3f}")
    vmap_rate, loop_rate, gap = throughput()
    print("\nsimulator throughput, FedAvg, 50 clients x 5 local steps (digits MLP, 1 thread)")
    print(f"vmap {vmap_rate:.2f} rounds/s, loop {loop_rate:.2f} rounds/s, ratio "
          f"{vmap_rate / loop_rate:.1f}x, max |param difference| {gap:.1e}")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
