"""Peak memory and speed of MeZO (zeroth-order SGD) vs backprop SGD vs forward-only inference.

    PYTHONPATH=src .venv/bin/python benchmarks/zeroth_order.py   # ~2-3 minutes on 2 cores
    PYTHONPATH=src .venv/bin/python benchmarks/zeroth_order.py --layers 4 --width 512

Model: an MLP of ``--layers`` square Linear layers (``--width``) with tanh, fp32, batch
``--batch``, MSE loss. Memory: each measurement runs in a fresh Python subprocess (one per
mode and repeat), which records its resident set size (``/proc/self/status`` VmRSS) after
importing torch, building the data and running one tiny step of every mode (so lazily
loaded library code is not charged to the first mode that loads it), then builds the model
and runs ``--steps`` steps; the figure is the peak RSS (``resource.getrusage``
``ru_maxrss``) minus that baseline, so it counts the weights plus everything the step
allocates. The median over ``--repeats`` subprocesses is printed. Speed: steps per second
in this process, interleaved rounds, median.
Goal of the method: MeZO's peak at most 1.2x inference, backprop SGD's at least 2x.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODES = ("inference", "sgd", "mezo")


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="steps per memory measurement")
    ap.add_argument("--repeats", type=int, default=3, help="subprocesses per mode")
    ap.add_argument("--speed-steps", type=int, default=10)
    ap.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)  # child process
    return ap.parse_args(argv)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _build(args: argparse.Namespace):
    from torch import nn

    layers = []
    for _ in range(args.layers):
        layers += [nn.Linear(args.width, args.width), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).eval()


def _data(args: argparse.Namespace):
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.width, generator=gen)
    return x, torch.randn(args.batch, args.width, generator=gen)


def _stepper(mode: str, model, x, y):
    """A function running one step of ``mode`` on ``model``."""
    import torch
    from torch import nn

    from gradkit.optim import MeZO

    if mode == "inference":
        def run() -> None:
            with torch.no_grad():
                nn.functional.mse_loss(model(x), y)
    elif mode == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def run() -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    else:
        zo = MeZO(model.parameters(), lr=1e-6, eps=1e-3, seed=0)

        def run() -> None:
            zo.step(lambda: nn.functional.mse_loss(model(x), y))
    return run


def _warm_up_lazy_imports() -> None:
    """One tiny step of every mode, so that code torch loads on first use (constructing an
    optimizer pulls in torch._dynamo, ~65 MiB of resident code) is in the baseline and not
    charged to the mode that happens to trigger it."""

    tiny = argparse.Namespace(layers=1, width=4, batch=2)
    model = _build(tiny)
    x, y = _data(tiny)
    for mode in MODES:
        _stepper(mode, model, x, y)()


def _child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = _data(args)
    _warm_up_lazy_imports()
    baseline = _rss_kib()
    model = _build(args)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    run = _stepper(args.measure, model, x, y)
    for _ in range(args.steps):
        run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_mib": (peak - baseline) / 1024, "weights_mib": weights / 2**20}))


def _measure(mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--measure", mode,
           "--layers", str(args.layers), "--width", str(args.width),
           "--batch", str(args.batch), "--steps", str(args.steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.measure:
        _child(args)
        return
    import torch

    peaks: dict[str, list[float]] = {m: [] for m in MODES}
    weights = 0.0
    for _ in range(args.repeats):
        for mode in MODES:  # interleaved, one fresh process each
            result = _measure(mode, args)
            peaks[mode].append(result["peak_mib"])
            weights = result["weights_mib"]
    memory = {m: statistics.median(v) for m, v in peaks.items()}
    print(f"model: MLP {args.layers} x Linear({args.width}, {args.width}), "
          f"{weights:.1f} MiB of fp32 weights; batch {args.batch}; torch {torch.__version__}")
    print(f"peak memory above the pre-model baseline (median of {args.repeats} fresh "
          f"processes, {args.steps} steps each):")
    print(f"  {'mode':<12}{'MiB':>10}{'x inference':>14}")
    for mode in MODES:
        print(f"  {mode:<12}{memory[mode]:>10.1f}{memory[mode] / memory['inference']:>14.2f}")
    ok_zo = memory["mezo"] <= 1.2 * memory["inference"]
    ok_sgd = memory["sgd"] >= 2.0 * memory["inference"]
    print(f"  goal MeZO <= 1.2x inference: {'met' if ok_zo else 'NOT met'}; "
          f"backprop SGD >= 2x: {'met' if ok_sgd else 'NOT met'}")

    torch.manual_seed(0)
    x, y = _data(args)
    model = _build(args)
    runs = {m: _stepper(m, model, x, y) for m in MODES}
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for run in runs.values():  # warm-up
        run()
    for _ in range(args.speed_steps):
        for mode, run in runs.items():
            start = time.perf_counter()
            run()
            times[mode].append(time.perf_counter() - start)
    rate = {m: 1.0 / statistics.median(v) for m, v in times.items()}
    print(f"speed ({torch.get_num_threads()} threads, median of {args.speed_steps} "
          "interleaved steps):")
    print(f"  {'mode':<12}{'steps/s':>10}{'x backprop':>14}")
    for mode in MODES:
        print(f"  {mode:<12}{rate[mode]:>10.2f}{rate[mode] / rate['sgd']:>14.2f}")
    print("  (a MeZO step is two forward passes plus three in-place sweeps drawing z;\n"
          "   it needs many more steps than backprop to reach the same loss)")


if __name__ == "__main__":
    main()
