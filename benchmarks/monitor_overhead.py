"""Overhead of the Monitor with the default instruments and schedule.

An MLP (64-128-64-10) on scikit-learn's digits trained for 500 Adam steps (batch 64), with
and without a Monitor writing JSONL + SQLite, in interleaved repeats (the order rotates every
repeat; a full garbage collection precedes every timed run). Configurations, side by side in
one run:

* ``default``: :func:`gradkit.instruments.default_instruments` (the target: <= 1.10x);
* ``default + Hessian at step 0``: the same with sharpness, trace and preconditioned
  sharpness also run at step 0 (by default they start at step 1000);
* ``dense``: loss and gradient norm every step, the other cheap ones every 10, per-example
  statistics and opposing signals every 50, Hessian instruments every 250;
* ``no Monitor (A/A control)``: the unmonitored loop again, timed against itself: its spread
  is the noise floor of the measurement on this machine.

Ratios are paired: each repeat divides a configuration's time by the unmonitored run of the
same repeat (adjacent in time, so load changes on a shared machine mostly cancel). Prints the
median paired ratio of CPU time (``process_time``) and of wall time, their interquartile
range and min-max, then each instrument's cost per
call in units of one training step (from the dense run; Cockpit reports 1.0-1.7x a step
per instrument run every step) and the steady-state overhead of the default schedule
predicted from those costs (sum over instruments of cost/every).

The repeats above run after a warm-up, i.e. they measure the steady state of a process that
has trained before. ``--cold N`` adds N interleaved pairs of fresh processes that each train
once with no warm-up (unmonitored / default Monitor), so first-call costs (lazy imports, the
first ``torch.func`` call, first file writes) are included as a user's first run pays them.

    .venv/bin/python benchmarks/monitor_overhead.py [--steps 500] [--repeats 15] [--threads 1]
                                                    [--cold 5]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
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
    if config in ("none", "none2"):
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
    gc.collect()  # same start for every run (collections during the run are counted)
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
           "hessian0": "default + Hessian at step 0", "dense": "dense",
           "none2": "no Monitor (A/A control)"}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def spread(ratios: list[float]) -> str:
    q1, med, q3 = quartiles(ratios)
    return (f"median {med:.3f}x (IQR {q1:.3f}-{q3:.3f}, "
            f"min-max {min(ratios):.3f}-{max(ratios):.3f})")


def cold_pairs(args) -> None:
    """Fresh-process runs without warm-up (the child prints ``cpu wall``)."""
    times: dict[str, list[tuple[float, float]]] = {"none": [], "default": []}
    for r in range(args.cold):
        for c in (["none", "default"] if r % 2 == 0 else ["default", "none"]):
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps),
                                  "--threads", str(args.threads), "--cold-child", c],
                                 check=True, capture_output=True, text=True).stdout.split()
            times[c].append((float(out[0]), float(out[1])))
    for k, label in ((0, "CPU "), (1, "wall")):
        ratios = [d[k] / n[k] for d, n in zip(times["default"], times["none"])]
        print(f"  cold first run, default      {label} {spread(ratios)} "
              f"({args.cold} fresh-process pairs, no warm-up)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cold", type=int, default=5)
    ap.add_argument("--cold-child", choices=["none", "default"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, y = load_digits_tensors()
    data = batches(x, y, args.steps)
    if args.cold_child:
        with tempfile.TemporaryDirectory() as tmp:
            c_cpu, c_wall, _, _ = train(data, args.cold_child, f"{tmp}/run")
        print(c_cpu, c_wall)
        return
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
    print("  paired ratios to the unmonitored run of the same repeat (ratio of medians in [])")
    for c in names[1:]:
        r_cpu = [a / b for a, b in zip(cpu[c], cpu["none"])]
        r_wall = [a / b for a, b in zip(wall[c], wall["none"])]
        target = "   <- target <= 1.10x" if c == "default" else ""
        print(f"  {CONFIGS[c]:28s} CPU  {spread(r_cpu)} "
              f"[{statistics.median(cpu[c]) / base_cpu:.3f}x]{target}")
        print(f"  {'':28s} wall {spread(r_wall)} "
              f"[{statistics.median(wall[c]) / base_wall:.3f}x]")
    if args.cold > 0:
        cold_pairs(args)
    print(f"  final parameters bitwise identical with and without Monitor: {same}")
    print(f"  one-time Monitor set-up + close (files, schema, checkpoint), not in the ratios: "
          f"{1e3 * setup[0]:.1f} ms CPU, {1e3 * setup[1]:.1f} ms wall")
    dense = monitors["dense"]
    default = {ins.name: ins for ins in default_instruments(torch.optim.Adam(
        make_model().parameters()))}
    print("  per instrument: cost per call in training steps (CPU, dense run); default schedule; "
          f"calls in a {args.steps}-step default run and their predicted share of it; "
          "steady-state share (cost/every)")
    run_total = steady = 0.0
    for ins in dense.instruments:
        secs, calls = dense.timings[ins.name]
        per_call = secs / max(calls, 1) / step
        d = default[ins.name]
        n_run = sum(d.due(t) for t in range(args.steps))
        run_total += per_call * n_run / args.steps
        steady += per_call / d.every
        print(f"    {ins.name:18s} {per_call:7.2f} steps/call ({int(calls):3d} calls)   "
              f"every {d.every:4d} from {d.start:4d}   {n_run:3d} calls "
              f"{100 * per_call * n_run / args.steps:5.2f}%   "
              f"steady {100 * per_call / d.every:5.2f}%")
    in_loop = sum(secs for secs, _ in monitors["default"].timings.values())
    print(f"  predicted instrument share of the {args.steps}-step default run: "
          f"{100 * run_total:.1f}%; measured inside the last default run: "
          f"{100 * in_loop / cpu['none'][-1]:.1f}% (the rest of the ratio: per-step "
          f"bookkeeping, record writing, and cache effects on the training step); "
          f"steady state of the default schedule (incl. the Hessian instruments from step "
          f"1000): {100 * steady:.1f}%")
    print("  Cockpit (Schneider et al., NeurIPS 2021) reports 1.0-1.7x a step per instrument "
          "run every step.")


if __name__ == "__main__":
    main()
