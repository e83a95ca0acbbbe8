"""Gradient coding figures: exactness of decoding, and time per round under exponential delays.

    PYTHONPATH=src python benchmarks/gradient_coding.py [--rounds 20000]

1. Decode error. For fractional (FRC) and cyclic (CRC) repetition codes, every straggler set
   of size 0..s is tried (itertools.combinations), the full gradient Σ_j h_j of random float64
   partial gradients is decoded from the responders, and the largest relative error
   ``max|decoded − full| / max|full|`` over all sets is printed (goal: ≤ 1e-10).
2. Time per round. Gradient coding with ``s`` stragglers gives every worker a ``(s+1)/n`` share
   of the data and waits for the first ``n − s`` workers; the uncoded baseline (``s = 0``)
   gives ``1/n`` and waits for all ``n``. Two i.i.d. delay models (seeded
   ``ExponentialDelays``): (a) ``load · Exp(1)``, the straggling scales with the work;
   (b) ``load · c + Exp(mean)``, a fixed compute rate plus straggling independent of the work.
   The simulated mean time per round is printed next to the theoretical order statistic
   ``E[τ_(n−s:n)] = shift + mean·(H_n − H_s)`` and as a ratio to the uncoded baseline.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from gradkit.distributed.coding import CyclicRepetitionCode, FractionalRepetitionCode
from gradkit.distributed.stragglers import ExponentialDelays, expected_order_statistic


def decode_errors(d: int = 256) -> None:
    print("1. decode error vs the full gradient, every straggler set of size <= s (float64)")
    print(f"{'code':34s} {'sets':>6s} {'max rel. error':>15s} {'max |a_i|':>10s}")
    gen = torch.Generator().manual_seed(0)
    for n, s in [(4, 1), (6, 1), (6, 2), (8, 1), (8, 3), (12, 2), (12, 3), (12, 5)]:
        codes = [CyclicRepetitionCode(n, s)]
        if n % (s + 1) == 0:
            codes.insert(0, FractionalRepetitionCode(n, s))
        for code in codes:
            h = torch.randn(code.k, d, generator=gen, dtype=torch.float64)
            full = h.sum(0)
            messages = code.encode(h)
            worst, sets, biggest = 0.0, 0, 0.0
            for v in range(s + 1):
                for stragglers in itertools.combinations(range(n), v):
                    alive = [i for i in range(n) if i not in stragglers]
                    a = code.decode(alive)
                    err = ((a @ messages - full).abs().max() / full.abs().max()).item()
                    worst, sets = max(worst, err), sets + 1
                    biggest = max(biggest, a.abs().max().item())
            print(f"{code!r:34s} {sets:6d} {worst:15.2e} {biggest:10.2f}")


def _row(name: str, load: float, sim: float, theory: float, base: float) -> None:
    print(f"{name:34s} {load:6.3f} {sim:10.4f} {theory:10.4f} {sim / base:11.2f}")


def round_times(rounds: int, n: int = 12, c: float = 1.0, mean: float = 0.2) -> None:
    print(f"\n2. time per round, n = {n}, {rounds} seeded rounds; 'theory' = E[(n-s)-th fastest]")
    header = f"{'scheme':34s} {'load':>6s} {'simulated':>10s} {'theory':>10s} {'vs uncoded':>11s}"
    models = [
        ("(a) delay = load · Exp(1): straggling grows with the work", None),
        (f"(b) delay = load · {c} + Exp({mean}): straggling independent of the work", c),
    ]
    for title, compute in models:
        print(f"\n{title}\n{header}")
        base = None
        for s in (0, 1, 2, 3, 5):
            load = (s + 1) / n
            if compute is None:
                model = ExponentialDelays(n, mean=1.0, seed=1 + s)
                delays = model.sample(rounds, load=load)
                theory = model.expected(n - s, load)
            else:
                model = ExponentialDelays(n, mean=mean, seed=1 + s)
                delays = model.sample(rounds) + load * compute
                theory = expected_order_statistic(n, n - s, mean, shift=load * compute)
            sim = delays.sort(dim=1).values[:, n - s - 1].mean().item()
            base = sim if base is None else base
            name = "uncoded, wait for all n" if s == 0 else f"coded s={s}, first n-s = {n - s}"
            _row(name, load, sim, theory, base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20000)
    args = parser.parse_args()
    start = time.perf_counter()
    decode_errors()
    round_times(args.rounds)
    print(f"\n(finished in {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
