"""Aggregator speed and agreement: gradkit.distributed vs ByzFL on identical inputs.

For n ∈ {10, 50} workers and d ∈ {1e5, 1e6} coordinates (float32, N(0, 1) rows, seed 0) and
f = n // 5, every rule that both libraries define is run on the same matrix; the table shows
the best wall time of each over ``--repeats`` or more calls (the two alternate, so load
changes on a shared machine hit both; one torch thread each by default), the ratio
ByzFL / gradkit (> 1: gradkit faster) and the largest absolute difference of the outputs
relative to the output's scale (``equal`` when below 1e-5, float32). Where a rule differs
between the two, the row says so:

* ``ARC``: the same rule; ByzFL computes the clipped count in floating point (they disagree
  only for n ≥ 121);
* ``NNM``: ByzFL materialises an (n, n − f, d) tensor; the cell is skipped when that needs
  more than ``--max-gb`` of memory (8 GB at n = 50, d = 1e6);
* ``MDA``: enumerates C(n, f) subsets in both; run only where C(n, f) ≤ 10 000;
* ``FlagAggregator``: not in ByzFL (gradkit's time only).

ByzFL's inputs are float32 tensors (it casts to float32 anyway). Goal: ≥ 3× for Krum,
Multi-Krum, geometric median and NNM; never slower for a shared rule. The default run takes
about 3 minutes on 2 busy cores.

    PYTHONPATH=src .venv/bin/python benchmarks/aggregators.py [--n 10 50] [--d 100000 1000000]
                                                            [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gradkit.distributed import aggregators as gk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "distributed"))
from byzfl_oracle import load as load_byzfl  # ByzFL without its federated framework


def _pairs(n: int, d: int, max_gb: float):
    """(name, gradkit factory, ByzFL factory or None, skip reason or '')."""
    bz_agg, bz_pre, _ = load_byzfl()
    f = n // 5
    nnm_gb = n * (n - f) * d * 4 / 2**30
    mda_ok = math.comb(n, f) <= 10_000
    return [
        ("Mean", gk.Mean, bz_agg.Average, ""),
        ("CoordinateMedian", gk.CoordinateMedian, bz_agg.Median, ""),
        (f"TrimmedMean(f={f})", lambda: gk.TrimmedMean(f=f), lambda: bz_agg.TrMean(f=f), ""),
        ("GeometricMedian(T=3)", gk.GeometricMedian, bz_agg.GeometricMedian, ""),
        (f"Krum(f={f})", lambda: gk.Krum(f=f), lambda: bz_agg.Krum(f=f), ""),
        (f"MultiKrum(f={f})", lambda: gk.MultiKrum(f=f), lambda: bz_agg.MultiKrum(f=f), ""),
        ("CenteredClipping", gk.CenteredClipping, bz_agg.CenteredClipping, ""),
        (f"MoNNA(f={f})", lambda: gk.MoNNA(f=f), lambda: bz_agg.MoNNA(f=f), ""),
        (f"MDA(f={f})", lambda: gk.MDA(f=f), lambda: bz_agg.MDA(f=f),
         "" if mda_ok else f"C({n},{f}) subsets"),
        (f"NNM(f={f})", lambda: gk.NNM(f=f), lambda: bz_pre.NNM(f=f),
         "" if nnm_gb <= max_gb else f"ByzFL needs {nnm_gb:.0f} GB"),
        ("Clipping(c=2)", gk.Clipping, bz_pre.Clipping, ""),
        (f"ARC(f={f})", lambda: gk.ARC(f=f), lambda: bz_pre.ARC(f=f), ""),
        ("Bucketing(s=2)", lambda: gk.Bucketing(s=2), lambda: bz_pre.Bucketing(s=2), ""),
        ("FlagAggregator(r=1)", gk.FlagAggregator, None, "not in ByzFL"),
    ]


def _timed(make: Callable[[], Callable], X: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Time ``make()(X)`` (construction included: both are cheap; CC must start fresh)."""
    gc.collect()
    torch.manual_seed(0)  # Bucketing draws its permutation from the global generator
    start = time.perf_counter()
    out = make()(X)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--d", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=3,
                        help="at least this many timed calls of each; fast cells repeat "
                             "until 0.5 s of calls (at most 30)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for both libraries (1: on a shared "
                             "machine, 2-thread kernels mostly wait for the second core)")
    parser.add_argument("--max-gb", type=float, default=2.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average "
          f"{load:.1f}; best of >= {args.repeats} calls; ratio = ByzFL time / gradkit time")
    header = f"{'n':>3} {'d':>8}  {'rule':<22}{'gradkit':>10}{'ByzFL':>10}{'ratio':>8}  outputs"
    print(header)
    print("-" * len(header))
    for d in args.d:
        for n in args.n:
            X = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
            for name, ours_f, theirs_f, skip in _pairs(n, d, args.max_gb):
                if skip.startswith("C("):
                    print(f"{n:>3} {d:>8.0e}  {name:<22}{'-':>10}{'-':>10}{'-':>8}  "
                          f"skipped: {skip}")
                    continue
                t_ours = t_theirs = math.inf
                out_ours = out_theirs = None
                spent, r = 0.0, 0
                while r < args.repeats or (spent < 1.0 and r < 30):
                    order = [0, 1] if r % 2 == 0 else [1, 0]
                    for which in order:
                        if which == 0:
                            t, out_ours = _timed(ours_f, X)
                            t_ours = min(t_ours, t)
                            spent += t
                        elif theirs_f is not None and not skip:
                            copy = X.clone()  # ByzFL's Clipping and ARC write into it
                            t, out_theirs = _timed(theirs_f, copy)
                            del copy
                            t_theirs = min(t_theirs, t)
                            spent += t
                    r += 1
                if out_theirs is None:
                    print(f"{n:>3} {d:>8.0e}  {name:<22}{t_ours * 1e3:>8.1f}ms{'-':>10}"
                          f"{'-':>8}  {skip}")
                    continue
                out_theirs = torch.as_tensor(out_theirs).to(out_ours.dtype)
                scale = max(1.0, float(out_theirs.abs().max()))
                diff = float((out_ours - out_theirs).abs().max()) / scale
                verdict = "equal" if diff <= 1e-5 else f"differ ({diff:.1e})"
                print(f"{n:>3} {d:>8.0e}  {name:<22}{t_ours * 1e3:>8.1f}ms"
                      f"{t_theirs * 1e3:>8.1f}ms{t_theirs / t_ours:>7.2f}x  {verdict}",
                      flush=True)


if __name__ == "__main__":
    main()
