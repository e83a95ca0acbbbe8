"""Cost of second-order optimizers: M-FAC's step time vs Adam's, and its memory vs m.

    PYTHONPATH=src .venv/bin/python benchmarks/second_order.py            # ~1 minute
    PYTHONPATH=src .venv/bin/python benchmarks/second_order.py --ngrads 16,64,256 --width 256

Model: an MLP of ``--layers`` Linear(``--width``, ``--width``) layers, fp32, with a fixed
random ``.grad`` per parameter (no forward/backward: only ``optimizer.step()`` is timed).
Every candidate is built on its own copy of the model, warmed up for ``ngrads`` steps (so
the M-FAC window is full), then timed in interleaved rounds (``torch.utils.benchmark``
``blocked_autorange``), median per step. Memory: the bytes of every tensor in the
optimizer's ``state`` (gradient window, m×m matrices, momentum), next to the model's.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn
from torch.utils.benchmark import Timer

from gradkit.optim import MFAC


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--ngrads", default="8,32,128", help="comma-separated window sizes m")
    ap.add_argument("--blocksize", type=int, default=1024, help="for the block-wise rows")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--window", type=float, default=0.2, help="seconds per timing window")
    return ap.parse_args()


def _model(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.layers)])
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    return model


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0)


def main() -> None:
    args = _parse()
    sizes = [int(m) for m in args.ngrads.split(",")]
    candidates: dict[str, torch.optim.Optimizer] = {}
    models: dict[str, nn.Module] = {}
    warm: dict[str, int] = {}
    for name, build, steps in (
        [("Adam", lambda p: torch.optim.Adam(p, lr=1e-4), 2)]
        + [(f"MFAC m={m}", lambda p, m=m: MFAC(p, lr=1e-4, ngrads=m, damp=1e-4), m)
           for m in sizes]
        + [(f"MFAC m={m} B={args.blocksize}",
            lambda p, m=m: MFAC(p, lr=1e-4, ngrads=m, damp=1e-4, blocksize=args.blocksize), m)
           for m in sizes]
    ):
        models[name] = _model(args)
        candidates[name] = build(models[name].parameters())
        warm[name] = steps
    for name, opt in candidates.items():
        for _ in range(warm[name]):
            opt.step()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.rounds):
        for name, opt in candidates.items():
            timer = Timer("opt.step()", globals={"opt": opt})
            times[name].append(timer.blocked_autorange(min_run_time=args.window).median)
    d = sum(p.numel() for p in models["Adam"].parameters())
    model_bytes = d * 4
    adam = statistics.median(times["Adam"])
    print(f"model: {args.layers} x Linear({args.width}, {args.width}), d = {d} parameters "
          f"({model_bytes / 2**20:.2f} MiB fp32); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.rounds} interleaved rounds")
    print(f"  {'optimizer':<22}{'step (ms)':>11}{'x Adam':>9}{'state (MiB)':>13}"
          f"{'x model':>9}")
    for name, opt in candidates.items():
        t = statistics.median(times[name])
        state = _state_bytes(opt)
        print(f"  {name:<22}{t * 1e3:>11.3f}{t / adam:>9.1f}{state / 2**20:>13.2f}"
              f"{state / model_bytes:>9.1f}")
    print("  (M-FAC state ≈ m·d window + m² per block; its step is O(m·d) products plus an "
          "O(m³) factorisation per block)")


if __name__ == "__main__":
    main()
