"""Gradient coding: exact gradients without waiting for stragglers.

    python examples/gradient_coding.py [--rounds 6] [--no-ray]

Part 1 (one process): Sequential Gradient Coding under a bursty straggler pattern. The
Selective-Repeat and Multiplexed schemes decode every job's exact gradient (checked against
the sum of all partition gradients) although some workers straggle in most rounds.

Part 2 (Ray, ``pip install 'gradkit[ray]'``): a parameter server with 6 worker actors trains a
small classifier. Every worker sleeps an exponential delay before computing (injected). The
uncoded server must wait for all 6; with a fractional repetition code (s = 2) the server decodes
the exact mean gradient from the first responders (one per group of 3).
"""

from __future__ import annotations

import argparse
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from gradkit.distributed.coding import (
    FractionalRepetitionCode,
    MultiplexedSGC,
    SelectiveRepeatSGC,
    simulate_coded,
)
from gradkit.distributed.stragglers import BurstyStragglers, ExponentialDelays


def sequential_demo(jobs: int = 30, n: int = 6) -> None:
    B, W, lam = 1, 3, 3
    pattern = BurstyStragglers(n, B, W, lam, p=0.5, seed=0).sample(jobs + W + B)
    print(f"Part 1: n = {n} workers, (B, W, λ) = ({B}, {W}, {lam})-bursty stragglers, "
          f"{int(pattern.any(dim=1).sum())} of {len(pattern)} rounds have stragglers")
    for scheme in (SelectiveRepeatSGC(n, B, W, lam, jobs=jobs),
                   MultiplexedSGC(n, B, W, lam, jobs=jobs)):
        h = torch.randn(jobs, scheme.num_partitions, 4, dtype=torch.float64)
        run = simulate_coded(scheme, lambda job, p, h=h: h[job, p], stragglers=pattern)
        err = max((g - f).abs().max().item() for g, f in zip(run.gradients, h.sum(1)))
        print(f"  {type(scheme).__name__:20s} load {scheme.load:.3f}, delay T = {scheme.T}, "
              f"{len(run.gradients)} jobs decoded, max error {err:.1e}, "
              f"rounds waited for everyone: {len(run.waited_for_all)}")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def ray_demo(rounds: int, n: int = 6, s: int = 2) -> None:
    from gradkit.distributed.ray_runtime import RayParameterServer, connect

    gen = torch.Generator().manual_seed(0)
    shards = [(torch.randn(64, 8, generator=gen), torch.randint(0, 3, (64,), generator=gen))
              for _ in range(n)]
    delays = ExponentialDelays(n, mean=0.5, seed=1).sample(rounds)
    connect(num_cpus=2, include_dashboard=False)
    print(f"\nPart 2: Ray, n = {n} workers, delays ~ Exp(mean 0.5 s), {rounds} rounds")
    for name, code in [("uncoded (wait for all)", FractionalRepetitionCode(n, 0)),
                       (f"fractional repetition s={s}", FractionalRepetitionCode(n, s))]:
        with RayParameterServer(make_model, F.cross_entropy, shards, code=code,
                                batch_size=16, delays=delays) as server:
            reports = server.run(rounds)
        mean_time = sum(r.seconds for r in reports) / rounds
        used = sum(len(r.responders) for r in reports) / rounds
        print(f"  {name:28s} {mean_time:6.2f} s per round, {used:.1f} responders used "
              f"(longest injected delay per round: {delays.max(dim=1).values.mean():.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    sequential_demo()
    if args.no_ray:
        return
    if importlib.util.find_spec("ray") is None:
        print("\nPart 2 needs Ray: pip install 'gradkit[ray]'")
        return
    ray_demo(args.rounds)


if __name__ == "__main__":
    main()
