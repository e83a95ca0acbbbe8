"""Robustness table: test accuracy of the mean vs each robust rule under Byzantine workers.

The digits MLP (64-64-64-10, ``gradkit.bench.workloads.DigitsMLP``) trained by the in-process
simulator with n = 10 workers (i.i.d. split by default; ``--alpha`` for Dirichlet label skew),
honest workers sending Polyak momentum (β = 0.9, as ByzFL's benchmark), the server stepping
SGD (lr 0.5) on the aggregate, ``--rounds`` rounds, batch 32, seed 0. For f = 1..⌊(n−1)/2⌋
Byzantine workers (the last f) running sign flipping or ALIE (ByzFL's τ = 1.5), each cell is
the final test accuracy; the first column is the same rule with no attack (f = 0). Every
rule is told the true f. One run prints everything side by side.

    PYTHONPATH=src .venv/bin/python benchmarks/robustness.py [--rounds 100] [--alpha 0.5]
                                                             [--rules mean krum ...]
"""

from __future__ import annotations

import argparse
import time

import torch

from gradkit.bench.workloads import DigitsMLP
from gradkit.distributed import aggregators as A
from gradkit.distributed.attacks import ALittleIsEnough, SignFlipping
from gradkit.distributed.simulator import Simulator

N_WORKERS = 10


def make_rule(name: str, f: int, n: int) -> A.Aggregator:
    """The rules of the table, each told the number of Byzantine workers f."""
    rules = {
        "mean": lambda: A.Mean(),
        "median": lambda: A.CoordinateMedian(),
        "trimmed_mean": lambda: A.TrimmedMean(f=f),
        "geometric_median": lambda: A.GeometricMedian(),
        "krum": lambda: A.Krum(f=f),
        "multi_krum": lambda: A.MultiKrum(f=f),
        "centered_clipping": lambda: A.CenteredClipping(tau=1.0),
        "mda": lambda: A.MDA(f=f),
        "monna": lambda: A.MoNNA(f=f, idx=0),
        "flag": lambda: A.FlagAggregator(r=n // 2, n_its=2, rescale="mean_norm"),
        "nnm+trimmed_mean": lambda: A.NNM(f=f) >> A.TrimmedMean(f=f),
        "nnm+krum": lambda: A.NNM(f=f) >> A.Krum(f=f),
    }
    return rules[name]()


RULES = ["mean", "median", "trimmed_mean", "geometric_median", "krum", "multi_krum",
         "centered_clipping", "mda", "monna", "flag", "nnm+trimmed_mean", "nnm+krum"]
ATTACKS = {"SF": SignFlipping, "ALIE": lambda: ALittleIsEnough(tau=1.5)}


def run_cell(rule: str, attack: str | None, f: int, *, rounds: int, alpha: float | None,
             seed: int) -> float:
    """Final test accuracy of one (rule, attack, f) cell."""
    sim = Simulator.from_workload(
        DigitsMLP(), N_WORKERS, alpha=alpha, seed=seed, split="test",
        aggregator=make_rule(rule, f, N_WORKERS),
        attack=ATTACKS[attack]() if attack else None, byzantine=f,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5), worker_momentum=0.9, batch_size=32,
    )
    return sim.run(rounds, eval_every=rounds).final_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=None,
                        help="Dirichlet label-skew α (default: i.i.d. split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rules", nargs="+", default=RULES, choices=RULES)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fs = list(range(1, (N_WORKERS - 1) // 2 + 1))
    split = "iid" if args.alpha is None else f"Dirichlet alpha={args.alpha}"
    print(f"digits MLP, n={N_WORKERS} workers ({split}), {args.rounds} rounds, seed {args.seed};"
          " test accuracy (%)")
    cols = ["f=0"] + [f"{a} f={f}" for a in ATTACKS for f in fs]
    print(f"{'rule':<18}" + "".join(f"{c:>10}" for c in cols))
    start = time.perf_counter()
    for rule in args.rules:
        cells = [run_cell(rule, None, 0, rounds=args.rounds, alpha=args.alpha, seed=args.seed)]
        for attack in ATTACKS:
            for f in fs:
                cells.append(run_cell(rule, attack, f, rounds=args.rounds, alpha=args.alpha,
                                      seed=args.seed))
        print(f"{rule:<18}" + "".join(f"{100 * c:>10.1f}" for c in cells), flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
