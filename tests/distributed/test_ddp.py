"""torch.distributed runtime: real gloo process groups on localhost, checked against the
in-process simulator with the same seeds."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradkit.distributed.aggregators import NNM, CoordinateMedian, GeometricMedian, Krum, Mean
from gradkit.distributed.attacks import ALittleIsEnough, LabelFlipping, SignFlipping
from gradkit.distributed.ddp import (
    RobustAllGather,
    RobustCommHook,
    check_process_group,
    is_coordinatewise,
    register_robust_hook,
)
from gradkit.distributed.simulator import Simulator, sample_batch, worker_generator

ROOT = Path(__file__).resolve().parents[2]
WORLD, SEED, ROUNDS, BATCH, LR = 4, 3, 3, 8, 0.1


def _setup():
    """The model (same initial weights on every rank) and one data shard per worker."""
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    shards = []
    for i in range(WORLD):
        g = torch.Generator().manual_seed(100 + i)
        shards.append((torch.randn(20, 6, generator=g), torch.randint(0, 3, (20,), generator=g)))
    return model, shards


class _CountingHook(RobustCommHook):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.buckets = set()

    def communicate(self, bucket):
        self.buckets.add(bucket.index())
        return super().communicate(bucket)


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = {}
        # 1. coordinate-wise rule through the DDP hook, tiny buckets (one per parameter)
        model, shards = _setup()
        x, y = shards[rank]
        ddp = DDP(model, bucket_cap_mb=1e-4)
        hook = _CountingHook(CoordinateMedian(), byzantine=[3], attack=SignFlipping(), seed=SEED)
        hook.register(ddp)
        opt = torch.optim.SGD(ddp.parameters(), lr=LR)
        for t in range(ROUNDS):
            idx = sample_batch(len(x), BATCH, worker_generator(SEED, rank, t))
            opt.zero_grad()
            F.cross_entropy(ddp(x[idx]), y[idx]).backward()
            opt.step()
        result["hook"] = [p.detach().clone() for p in model.parameters()]
        result["buckets"] = len(hook.buckets)
        # 2. whole-vector rule through the explicit all-gather, on a plain model
        model, shards = _setup()
        sync = RobustAllGather(
            Krum(f=1), byzantine=[3], attack=ALittleIsEnough(), seed=SEED, world_size=world
        )
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        for t in range(ROUNDS):
            idx = sample_batch(len(x), BATCH, worker_generator(SEED, rank, t))
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            sync.step(model)
            opt.step()
        result["allgather"] = [p.detach().clone() for p in model.parameters()]
        # 3. ranks holding vectors of different lengths: every rank gets the same clear error
        try:
            sync.aggregate(torch.zeros(5 + (rank == 0)))
        except ValueError as exc:
            result["mismatch"] = str(exc)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _launch(fn, world, args):
    """In a fresh process: become a process-group leader, then fork the ``world`` ranks (fork
    after a single import of torch: much cheaper than importing it in every rank)."""
    os.setsid()
    mp.start_processes(fn, args=(world, *args), nprocs=world, join=True, start_method="fork")


def _spawn(fn, world, *args, timeout=240):
    """Run ``fn(rank, world, *args)`` in ``world`` processes; none outlives the call (the
    launcher and its ranks share a process group, killed in ``finally``)."""
    launcher = mp.get_context("spawn").Process(target=_launch, args=(fn, world, args))
    launcher.start()
    try:
        launcher.join(timeout)
        if launcher.is_alive():
            raise TimeoutError(f"{world} gloo processes did not finish in {timeout} s")
        assert launcher.exitcode == 0, f"a rank failed (launcher exit code {launcher.exitcode})"
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            launcher.kill()
        launcher.join()


def _simulate(aggregator, attack):
    model, shards = _setup()
    sim = Simulator(
        model, F.cross_entropy, shards, aggregator,
        optimizer=lambda params: torch.optim.SGD(params, lr=LR),
        byzantine=[3], attack=attack, batch_size=BATCH, seed=SEED, vectorize=False,
    )
    for _ in range(ROUNDS):
        sim.step()
    return [p.detach() for p in model.parameters()]


def test_four_gloo_ranks_one_byzantine_match_simulator(tmp_path):
    """4 real processes, rank 3 Byzantine. Equality is exact (bitwise): every rank computes its
    minibatch gradient with the same autograd kernels as the simulator's per-worker path, and a
    coordinate-wise median (hook, per bucket) or Krum (whole vector) selects or orders the same
    float values, so no summation order differs."""
    _spawn(_worker, WORLD, str(tmp_path / "pg"), str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert results[0]["buckets"] > 1  # the hook really ran per bucket
    expected = {
        "hook": _simulate(CoordinateMedian(), SignFlipping()),
        "allgather": _simulate(Krum(f=1), ALittleIsEnough()),
    }
    start = _setup()[0]
    for path, params in expected.items():
        assert any(not torch.equal(p, q) for p, q in zip(params, start.parameters()))
        for r in range(WORLD):
            for got, want in zip(results[r][path], params):
                assert torch.equal(got, want), (path, r, (got - want).abs().max())
    for r in range(WORLD):
        assert "different lengths [6, 5, 5, 5]" in results[r]["mismatch"]


# ------------------------------------------------------------------ single-process checks


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_process_group_not_initialised():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match=r"not initialised: call torch\.distributed\.init_pro"):
        check_process_group()
    with pytest.raises(RuntimeError, match="not initialised"):
        RobustAllGather(Mean())


def test_mismatched_world_size(one_rank_group):
    with pytest.raises(ValueError, match=r"world size of 4 .* 1 ranks.*--nproc_per_node=4"):
        RobustAllGather(Mean(), world_size=4)
    assert check_process_group(world_size=1) == 1


def test_bad_arguments(one_rank_group):
    with pytest.raises(ValueError, match=r"Invalid byzantine value: 1 .*indices in 0\.\.0"):
        RobustAllGather(Mean(), byzantine=[1], attack=SignFlipping())
    with pytest.raises(ValueError, match="every one of the 1 workers is Byzantine"):
        RobustAllGather(Mean(), byzantine=[0], attack=SignFlipping())
    with pytest.raises(ValueError, match="no attack"):
        RobustAllGather(Mean(), byzantine=[0])
    with pytest.raises(ValueError, match=r"flipped labels.*Simulator"):
        RobustAllGather(Mean(), byzantine=[0], attack=LabelFlipping())
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        RobustCommHook(Mean()).register(nn.Linear(2, 2))
    sync = RobustAllGather(Mean())
    with pytest.raises(ValueError, match=r"flat \(d,\) vector"):
        sync.aggregate(torch.zeros(2, 2))


def test_one_rank_allgather_is_the_rule(one_rank_group):
    model = nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    before = torch.cat([p.grad.flatten() for p in model.parameters()])
    out = RobustAllGather(Mean()).step(model)
    assert torch.equal(out, before)
    assert torch.equal(torch.cat([p.grad.flatten() for p in model.parameters()]), before)


def test_hook_refuses_whole_vector_rules(one_rank_group):
    ddp = DDP(nn.Linear(3, 2))
    for rule in (Krum(f=0), GeometricMedian(), NNM(f=0) >> Mean()):
        assert not is_coordinatewise(rule)
        with pytest.raises(ValueError, match=r"whole-vector rule.*RobustAllGather"):
            register_robust_hook(ddp, rule)
    assert is_coordinatewise(Mean()) and is_coordinatewise(CoordinateMedian())


@pytest.mark.slow
def test_torchrun_example(tmp_path):
    """The example runs under torchrun from the repository root (4 gloo processes)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
           str(ROOT / "examples" / "torchrun_robust.py"), "--steps", "5"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "coordinate-wise median (DDP hook)" in proc.stdout
    assert "Krum (all-gather)" in proc.stdout
