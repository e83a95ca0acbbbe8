"""Overhead of the Monitor with the default instruments and schedule.

An MLP (64-128-64-10) on scikit-learn's digits trained for 500 Adam steps (batch 64), with
and without a Monitor writing JSONL + SQLite, in interleaved repeats (the order rotates every
repeat). Configurations, side by side in one run:

* ``default``: :func:`gradkit.instruments.default_instruments` (the target: <= 1.10x);
* ``default + Hessian at step 0``: the same with sharpness, trace and preconditioned
  sharpness also run at step 0 (by default they start at step 1000);
* ``dense``: loss and gradient norm every step, the other cheap ones every 10, per-example
  statistics and opposing signals every 50, Hessian instruments every 250.

Prints the median CPU time (``process_time``: robust on a shared machine) and wall time of
each configuration and their ratio to the unmonitored loop, then each instrument's cost per
call in units of one training step (from the dense run; Cockpit reports 1.0-1.7x a step
per instrument run every step) and the steady-state overhead of the default schedule
predicted from those costs (sum over instruments of cost/every).

    .venv/bin/python benchmarks/monitor_overhead.py [--steps 500] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch import nn

from gradkit.instruments import Monitor, default_instruments


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x, torch.tensor(data.target)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def batches(x, y, steps, batch_size=64):
    gen = torch.Generator().manual_seed(1)  # fixed order, independent of the global RNG
    out, perm = [], torch.randperm(len(x), generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > len(x):
            perm, pos = torch.randperm(len(x), generator=gen), 0
        idx = perm[pos:pos + batch_size]
        out.append((x[idx], y[idx], idx))
        pos += batch_size
    return out


EXPENSIVE = ("sharpness", "hessian_trace", "precond_sharpness")


def instruments(config: str, opt) -> list | None:
    if config == "none":
        return None
    out = default_instruments(opt)
    for ins in out:
        if config == "hessian0" and ins.name in EXPENSIVE:
            ins.start = 0
        if config == "dense":
            ins.start = 0
            ins.every = {"loss": 1, "grad_norm": 1}.get(ins.name, 10)
            if ins.name in ("coherence", "noise_scale", "grad_snr", "opposing"):
                ins.every = 50
            if ins.name in EXPENSIVE:
                ins.every = 250
    return out


def train(data, config: str, log_dir: str):
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.functional.cross_entropy
    ins = instruments(config, opt)
    # one-time set-up (files, SQLite schema) and the final close are timed separately
    mon = (Monitor(model, loss_fn, opt, instruments=ins, log_dir=log_dir,
                   clock=time.process_time) if ins is not None else None)
    w0, t0 = time.perf_counter(), time.process_time()
    for xb, yb, ids in data:
        opt.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        if mon is None:
            opt.step()
        else:
            with mon.step((xb, yb, ids), loss=loss):
                opt.step()
    if mon is not None:
        mon.flush()  # every record written to JSONL and SQLite
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    if mon is not None:
        mon.close()
    return cpu, wall, [p.detach().clone() for p in model.parameters()], mon


CONFIGS = {"none": "no Monitor", "default": "default",
           "hessian0": "default + Hessian at step 0", "dense": "dense"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, y = load_digits_tensors()
    data = batches(x, y, args.steps)
    names = list(CONFIGS)
    cpu = {c: [] for c in names}
    wall = {c: [] for c in names}
    same, monitors = True, {}
    with tempfile.TemporaryDirectory() as tmp:
        for c in names:  # warm-up (allocator, first-call overheads)
            train(data[:30], c, f"{tmp}/warm-{c}")
        for r in range(args.repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            params = {}
            for c in order:
                c_cpu, c_wall, params[c], monitors[c] = train(data, c, f"{tmp}/{r}-{c}")
                cpu[c].append(c_cpu)
                wall[c].append(c_wall)
            same &= all(torch.equal(a, b) for c in names[1:]
                        for a, b in zip(params[c], params["none"]))
        w0, t0 = time.perf_counter(), time.process_time()
        Monitor(make_model(), nn.functional.cross_entropy, log_dir=f"{tmp}/setup").close()
        setup = (time.process_time() - t0, time.perf_counter() - w0)
    base_cpu, base_wall = statistics.median(cpu["none"]), statistics.median(wall["none"])
    step = base_cpu / args.steps
    print(f"MLP 64-128-64-10 on digits, Adam, batch 64, {args.steps} steps, "
          f"{args.repeats} interleaved repeats, {args.threads} thread(s)")
    print(f"  no Monitor: median {base_cpu:.3f}s CPU ({1e3 * step:.3f} ms/step), "
          f"{base_wall:.3f}s wall")
    for c in names[1:]:
        r_cpu = statistics.median(cpu[c]) / base_cpu
        r_wall = statistics.median(wall[c]) / base_wall
        target = "  (target <= 1.10x)" if c == "default" else ""
        print(f"  {CONFIGS[c]:28s} ratio {r_cpu:.3f}x CPU, {r_wall:.3f}x wall{target}; "
              f"CPU per repeat {[round(a / b, 3) for a, b in zip(cpu[c], cpu['none'])]}")
    print(f"  final parameters bitwise identical with and without Monitor: {same}")
    print(f"  one-time Monitor set-up + close (files, schema, checkpoint), not in the ratios: "
          f"{1e3 * setup[0]:.1f} ms CPU, {1e3 * setup[1]:.1f} ms wall")
    dense = monitors["dense"]
    default = {ins.name: ins for ins in default_instruments(torch.optim.Adam(
        make_model().parameters()))}
    print("  per instrument: cost per call in training steps (CPU, dense run), default "
          "schedule, predicted steady-state share of the default schedule")
    total = 0.0
    for ins in dense.instruments:
        secs, calls = dense.timings[ins.name]
        per_call = secs / max(calls, 1) / step
        d = default[ins.name]
        total += per_call / d.every
        print(f"    {ins.name:18s} {per_call:7.2f} steps/call ({int(calls):3d} calls)   "
              f"every {d.every:4d} from {d.start:4d}   {100 * per_call / d.every:5.2f}%")
    print(f"  predicted steady-state instrument overhead of the default schedule: "
          f"{100 * total:.1f}% (plus the per-step bookkeeping)")
    print("  Cockpit (Schneider et al., NeurIPS 2021) reports 1.0-1.7x a step per instrument "
          "run every step.")


if __name__ == "__main__":
    main()
