"""Edge of stability: full-batch GD sharpens until λ_max(∇²L) reaches 2/η (Cohen et al., 2021).

A small tanh MLP on a subset of scikit-learn's digits, trained by full-batch gradient descent
on the MSE to one-hot targets (the setting of Cohen et al.), with a Monitor tracking the
sharpness (top Hessian eigenvalue of the full-batch loss, warm-started Lanczos) every few
steps against the GD threshold 2/η, and the Hessian trace. Prints the sharpness trace and
writes the run (JSONL + SQLite) and its dashboard PNG.

    .venv/bin/python examples/edge_of_stability.py [--lr 0.2] [--steps 2000]
        [--run-dir runs/edge_of_stability] [--out runs/edge_of_stability/dashboard.png]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from gradkit.instruments import GradNorm, HessianTrace, Loss, Monitor, Sharpness, plot


def digits_subset(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data[:n], dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = nn.functional.one_hot(torch.tensor(data.target[:n]), 10).float()
    return x, y


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """½‖f(x) − y‖² averaged over examples (Cohen et al.'s square loss)."""
    return 0.5 * ((outputs - targets) ** 2).sum(dim=1).mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--examples", type=int, default=500)
    ap.add_argument("--sharpness-every", type=int, default=10)
    ap.add_argument("--run-dir", default="runs/edge_of_stability")
    ap.add_argument("--out", default=None, help="dashboard PNG (default RUN_DIR/dashboard.png)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = digits_subset(args.examples)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)  # full batch: plain GD
    run_dir = Path(args.run_dir)
    for name in ("metrics.jsonl", "metrics.sqlite"):
        (run_dir / name).unlink(missing_ok=True)  # one run (else earlier runs are drawn too)
    monitor = Monitor(model, mse, opt, log_dir=run_dir, instruments=[
        Loss(every=1), GradNorm(every=1),
        Sharpness(every=args.sharpness_every, data=(x, y)),
        HessianTrace(every=100, data=(x, y), n_probes=20),
    ])
    threshold = 2 / args.lr
    print(f"full-batch GD, lr={args.lr}: threshold 2/lr = {threshold:.2f}")
    print(f"{'step':>6} {'loss':>10} {'sharpness':>10} {'sharp/(2/lr)':>13}")
    t0 = time.perf_counter()
    for step in range(args.steps):
        opt.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        with monitor.step((x, y), loss=loss) as handle:
            opt.step()
        rec = handle.record
        if step % 100 == 0 and "sharpness" in rec:
            print(f"{step:6d} {rec['loss']:10.5f} {rec.get('sharpness', float('nan')):10.3f} "
                  f"{rec.get('sharpness', float('nan')) / threshold:13.3f}")
    monitor.close()
    steps, sharp = monitor.series("sharpness")
    late = [s for t, s in zip(steps, sharp) if t >= args.steps // 2]
    print(f"sharpness: start {sharp[0]:.3f}, max {max(sharp):.3f}; second half mean "
          f"{sum(late) / len(late):.3f} = {sum(late) / len(late) / threshold:.3f} x 2/lr "
          f"({time.perf_counter() - t0:.1f}s)")
    out = plot(run_dir, args.out or run_dir / "dashboard.png",
               title=f"edge of stability: full-batch GD, lr={args.lr}, 2/lr={threshold:.0f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
