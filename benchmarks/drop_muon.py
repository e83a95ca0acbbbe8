"""Wall time per training step (forward + backward + step): Drop-Muon vs Muon.

    .venv/bin/python benchmarks/drop_muon.py [--repeats 7] [--steps 5] [--threads 1]

Models: an MLP with 8 linear layers and a CNN with 6 conv layers + a linear head. Both
optimizers use the same parameter groups (one Drop-Muon layer per module; matrices -> Muon,
biases -> AdamW). Drop-Muon samples the cutoff before the forward pass
(``opt.sample_cutoff()``), so backward stops at the cutoff. Repeats are interleaved (Muon and
Drop-Muon alternate, order flipped every repeat) and the median per-step time is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from gradkit.optim import DropMuon, Muon, drop_muon_layer_groups


def mlp(width: int = 512, depth: int = 8) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def cnn(channels: int = 32, depth: int = 6) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Conv2d(3 if i == 0 else channels, channels, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))


def time_steps(model, opt, x, y, steps: int, fractions: list[float] | None) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        if isinstance(opt, DropMuon):
            opt.sample_cutoff()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if fractions is not None:
            fractions.append((opt.num_layers - opt.last_cutoff) / opt.num_layers)
    return (time.perf_counter() - start) / steps


def bench(name: str, build, x, y, repeats: int, steps: int) -> None:
    torch.manual_seed(0)
    m_muon, m_drop = build(), build()
    m_drop.load_state_dict(m_muon.state_dict())
    muon = Muon(drop_muon_layer_groups(m_muon), lr=0.02)
    drop = DropMuon(m_drop, lr=0.02, seed=0)
    for model, opt in ((m_muon, muon), (m_drop, drop)):  # warm-up: state, allocator
        time_steps(model, opt, x, y, 2, None)
    times: dict[str, list[float]] = {"muon": [], "dropmuon": []}
    fractions: list[float] = []
    for r in range(repeats):
        order = [("muon", m_muon, muon), ("dropmuon", m_drop, drop)]
        for key, model, opt in order if r % 2 == 0 else order[::-1]:
            times[key].append(time_steps(model, opt, x, y, steps,
                                         fractions if key == "dropmuon" else None))
    t_muon, t_drop = statistics.median(times["muon"]), statistics.median(times["dropmuon"])
    print(f"{name:4s} layers={drop.num_layers}  muon {t_muon * 1e3:8.2f} ms/step  "
          f"dropmuon {t_drop * 1e3:8.2f} ms/step  ratio dropmuon/muon {t_drop / t_muon:.3f}  "
          f"mean fraction of layers updated {statistics.mean(fractions):.3f} "
          f"(uniform: {(drop.num_layers + 1) / (2 * drop.num_layers):.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats "
          f"{args.repeats} x {args.steps} steps, median per-step wall time")
    gen = torch.Generator().manual_seed(0)
    x_mlp, y_mlp = torch.randn(256, 512, generator=gen), torch.randint(0, 10, (256,), generator=gen)
    bench("mlp", mlp, x_mlp, y_mlp, args.repeats, args.steps)
    x_cnn = torch.randn(32, 3, 32, 32, generator=gen)
    y_cnn = torch.randint(0, 10, (32,), generator=gen)
    bench("cnn", cnn, x_cnn, y_cnn, args.repeats, args.steps)


if __name__ == "__main__":
    main()
