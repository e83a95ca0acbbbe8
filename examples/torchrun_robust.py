"""Byzantine-robust training under torchrun: 4 CPU processes (gloo), the last one Byzantine.

    torchrun --nproc_per_node=4 examples/torchrun_robust.py [--steps 60] [--attack ipm]

Every process is one worker with its own shard of a synthetic 3-class problem (generated
here, no downloads). The last rank is Byzantine: after the all-gather its gradient is replaced
by an attack computed from the honest ones (inner-product manipulation by default, which makes
the plain mean climb the loss). The same training runs three times from the same weights:

* plain mean through the DDP hook (not robust),
* coordinate-wise median through the DDP hook (``gradkit.distributed.ddp.register_robust_hook``),
* Krum through one all-gather of the whole flattened gradient per step
  (``gradkit.distributed.ddp.RobustAllGather``); Krum compares whole vectors, so it must not run
  per DDP bucket and the hook refuses it.

Rank 0 prints the held-out loss and accuracy of each.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradkit.distributed.aggregators import CoordinateMedian, Krum, Mean
from gradkit.distributed.attacks import InnerProductManipulation, SignFlipping
from gradkit.distributed.ddp import RobustAllGather, register_robust_hook
from gradkit.distributed.simulator import sample_batch, worker_generator

ATTACKS = {"ipm": lambda: InnerProductManipulation(tau=4.0), "signflip": SignFlipping}


def blobs(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs in 10 dimensions."""
    centers = torch.tensor([[2.0] * 5 + [0.0] * 5, [0.0] * 5 + [2.0] * 5, [-2.0] * 10])
    y = torch.randint(0, 3, (n,), generator=gen)
    return centers[y] + 1.5 * torch.randn(n, 10, generator=gen), y


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        out = model(x)
        return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--attack", choices=sorted(ATTACKS), default="ipm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo",
                        help="nccl: one CUDA device per rank (cuda:LOCAL_RANK)")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        sys.exit("start it with: torchrun --nproc_per_node=4 examples/torchrun_robust.py")

    torch.set_num_threads(1)
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    try:
        x, y = blobs(256, torch.Generator().manual_seed(1000 + rank))  # this rank's shard
        x_test, y_test = blobs(1000, torch.Generator().manual_seed(999))
        x, y, x_test, y_test = (t.to(device) for t in (x, y, x_test, y_test))
        byzantine = [world - 1] if world > 1 else []  # one rank alone stays honest
        common = dict(byzantine=byzantine, attack=ATTACKS[args.attack](), seed=args.seed)

        def batches():
            for t in range(args.steps):
                idx = sample_batch(len(x), args.batch_size, worker_generator(args.seed, rank, t))
                yield x[idx], y[idx]

        results = {}
        for name, rule in [("mean (DDP hook)", Mean()),
                           ("coordinate-wise median (DDP hook)", CoordinateMedian())]:
            model = make_model().to(device)
            ddp = DDP(model)
            register_robust_hook(ddp, rule, **common)
            opt = torch.optim.SGD(ddp.parameters(), lr=args.lr)
            for xb, yb in batches():
                opt.zero_grad()
                F.cross_entropy(ddp(xb), yb).backward()
                opt.step()
            results[name] = evaluate(model, x_test, y_test)

        model = make_model().to(device)
        sync = RobustAllGather(Krum(f=len(byzantine)), world_size=world, **common)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
        for xb, yb in batches():
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            sync.step(model)
            opt.step()
        results["Krum (all-gather)"] = evaluate(model, x_test, y_test)

        if rank == 0:
            start = evaluate(make_model().to(device), x_test, y_test)
            who = f"rank {byzantine[0]} Byzantine ({common['attack']!r})" if byzantine else \
                "no Byzantine rank"
            print(f"{world} {args.backend} ranks, {who}, {args.steps} steps")
            print(f"{'rule':36s} {'test loss':>10s} {'accuracy':>9s}")
            print(f"{'(initial model)':36s} {start[0]:10.4f} {start[1]:9.3f}")
            for name, (loss, acc) in results.items():
                print(f"{name:36s} {loss:10.4f} {acc:9.3f}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
