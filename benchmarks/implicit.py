"""Hypergradient wall time: implicit differentiation vs unrolled backprop (vs torchopt).

    PYTHONPATH=src .venv/bin/python benchmarks/implicit.py [--n 2000] [--d 200] [--steps 200]
        [--repeats 5] [--threads 1]

Inner problem: L2-regularised logistic regression with per-example weights, solved by
``--steps`` gradient-descent steps (step 1/L). Hyperparameters: the per-example weights (n)
and the log regularisation strength. Outer loss: a fixed linear function of the solution.
Each method computes solution + hypergradient from scratch:

* ``unrolled``: gradient descent with autograd recording every step, then ``backward``;
* ``gradkit cg`` / ``gradkit normal_cg``: ``gradkit.implicit.custom_root`` (solver without
  autograd, backward = CG on the Hessian system, or CG on its normal equations);
* ``torchopt cg`` / ``torchopt normal_cg``: ``torchopt.diff.implicit.custom_root`` with the
  same solver and linear solver, if torchopt is installed.

Repeats are interleaved; the median total time (solve + hypergradient) and backward time
(``torch.autograd.grad`` only; for ``unrolled`` the backward through the recorded steps)
are reported with their ratio to ``unrolled``, and the max abs difference of the
hypergradient to ``unrolled``'s.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from gradkit.implicit import custom_root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--d", type=int, default=200)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dt = torch.float64
    X = torch.randn(args.n, args.d, dtype=dt) / args.d**0.5
    labels = (torch.rand(args.n, dtype=dt) < torch.sigmoid(X @ torch.randn(args.d, dtype=dt)))
    labels = labels.to(dt)
    outer = torch.randn(args.d, dtype=dt)
    lam0 = 0.1
    lr = 1.0 / (0.25 * float(torch.linalg.matrix_norm(X, 2)) ** 2 / args.n + lam0)

    def F(w, log_lam, weights):  # gradient in w of the weighted logistic loss + penalty
        r = weights * (torch.sigmoid(X @ w) - labels)
        return X.T @ r / args.n + torch.exp(log_lam) * w

    def gd(w, log_lam, weights):
        for _ in range(args.steps):
            w = w - lr * F(w, log_lam, weights)
        return w

    def inner(init, log_lam, weights):
        with torch.no_grad():
            return gd(init, log_lam.detach(), weights.detach())

    w0 = torch.zeros(args.d, dtype=dt)
    methods = {
        "unrolled": gd,
        "gradkit cg": custom_root(F, "cg", tol=1e-10)(inner),
        "gradkit normal_cg": custom_root(F, "normal_cg", tol=1e-10)(inner),
    }
    try:
        import torchopt
        from torchopt.diff.implicit import custom_root as to_root

        ls = torchopt.linear_solve
        methods["torchopt cg"] = to_root(F, argnums=(1, 2), solve=ls.solve_cg(rtol=1e-10))(inner)
        methods["torchopt normal_cg"] = to_root(
            F, argnums=(1, 2), solve=ls.solve_normal_cg(rtol=1e-10)
        )(inner)
    except ImportError:
        print("torchopt not installed: its rows are skipped (pip install torchopt)")

    def run(fn):
        ll = torch.tensor(lam0, dtype=dt).log().requires_grad_()
        wt = torch.ones(args.n, dtype=dt, requires_grad=True)
        start = time.perf_counter()
        w = fn(w0, ll, wt)
        mid = time.perf_counter()
        g = torch.autograd.grad(w @ outer, (ll, wt))
        end = time.perf_counter()
        return (end - start, end - mid), torch.cat([g[0].reshape(1), g[1]])

    times: dict[str, list[tuple[float, float]]] = {k: [] for k in methods}
    grads: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torchopt calls functorch.vjp
        for r in range(args.repeats + 1):  # the first round warms up
            order = list(methods) if r % 2 == 0 else list(reversed(methods))
            for k in order:
                t, g = run(methods[k])
                if r > 0:
                    times[k].append(t)
                grads[k] = g
    def med(k, i):
        return statistics.median(t[i] for t in times[k])

    base, base_bwd = med("unrolled", 0), med("unrolled", 1)
    print(f"logistic regression n={args.n} d={args.d}, {args.steps} GD steps, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print(f"{'method':<20}{'total [ms]':>11}{'ratio':>8}{'backward [ms]':>15}{'ratio':>8}"
          f"{'max|g - g_unrolled|':>22}")
    for k in methods:
        m, b = med(k, 0), med(k, 1)
        err = float((grads[k] - grads["unrolled"]).abs().max())
        print(f"{k:<20}{1e3 * m:>11.1f}{m / base:>7.2f}x{1e3 * b:>15.1f}{b / base_bwd:>7.2f}x"
              f"{err:>22.2e}")


if __name__ == "__main__":
    main()
