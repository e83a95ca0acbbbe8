"""Step time of robust aggregation under DDP vs plain all-reduce, 4 gloo processes on CPU.

    PYTHONPATH=src python benchmarks/ddp_hook.py [--world 4] [--hidden 512] [--steps 12]

Each rank trains the same MLP on its own random batch. Configurations, measured in
interleaved blocks (A B C … A B C …) so that machine-load drift hits all of them alike:

* ``all-reduce``: DDP's default communication (the baseline);
* ``hook: Mean``: the robust hook with the plain mean (all-gather + mean: the cost of the
  all-gather alone);
* ``hook: CoordinateMedian`` and ``hook: TrimmedMean(f=1)``: coordinate-wise robust rules per
  bucket;
* ``all-gather: Krum(f=1)``: a whole-vector rule through one all-gather of the flattened
  gradient (:class:`gradkit.distributed.ddp.RobustAllGather`), model without DDP.

Rank 0 prints the median step time of each and its ratio to all-reduce.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradkit.distributed.aggregators import CoordinateMedian, Krum, Mean, TrimmedMean
from gradkit.distributed.ddp import RobustAllGather, register_robust_hook


def make_model(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, 10))


def run(rank: int, world: int, init_file: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        gen = torch.Generator().manual_seed(rank)
        x, y = torch.randn(64, 256, generator=gen), torch.randint(0, 10, (64,), generator=gen)
        configs = {}

        def ddp_step(model, opt):
            def step():
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            return step

        for name, rule in [("all-reduce (DDP default)", None), ("hook: Mean", Mean()),
                           ("hook: CoordinateMedian", CoordinateMedian()),
                           ("hook: TrimmedMean(f=1)", TrimmedMean(f=1))]:
            model = DDP(make_model(args.hidden))
            if rule is not None:
                register_robust_hook(model, rule)
            configs[name] = ddp_step(model, torch.optim.SGD(model.parameters(), lr=0.01))

        plain = make_model(args.hidden)
        sync = RobustAllGather(Krum(f=1), world_size=world)
        plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01)

        def allgather_step():
            plain_opt.zero_grad()
            F.cross_entropy(plain(x), y).backward()
            sync.step(plain)
            plain_opt.step()

        configs["all-gather: Krum(f=1)"] = allgather_step
        times: dict[str, list[float]] = {name: [] for name in configs}
        for step in configs.values():  # warm-up (DDP rebuilds its buckets after step 1)
            step()
            step()
        block = max(1, args.steps // args.blocks)
        for _ in range(args.blocks):
            for name, step in configs.items():
                dist.barrier()
                for _ in range(block):
                    t0 = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - t0)
        if rank == 0:
            d = sum(p.numel() for p in plain.parameters())
            base = statistics.median(times["all-reduce (DDP default)"])
            print(f"{world} gloo ranks on {os.cpu_count()} CPU cores, MLP with d = {d:,} "
                  f"parameters, {block * args.blocks} timed steps each")
            print(f"{'configuration':28s} {'median step':>12s} {'vs all-reduce':>14s}")
            for name, ts in times.items():
                med = statistics.median(ts)
                print(f"{name:28s} {med * 1e3:9.1f} ms {med / base:13.2f}x")
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--blocks", type=int, default=3)
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(run, args=(args.world, os.path.join(tmp, "pg"), args),
                           nprocs=args.world, join=True, start_method="spawn")
    print(f"(finished in {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
