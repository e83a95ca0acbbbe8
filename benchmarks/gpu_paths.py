"""GPU checks of gradkit's optimizer paths, on a CUDA machine:

    PYTHONPATH=src python3 benchmarks/gpu_paths.py

For each optimizer and path (loop / foreach / fused where it exists) on CUDA float32, 20 steps
from the same parameters and gradients are compared with a float64 CPU run of the
loop path; the default path (foreach=None) is run too, and the learning rate is halved at
step 10 so that the fused paths run after a scheduler-style change. Exit status 1 on any
mismatch (relative error above 1e-4).
"""
import sys
import time

import torch

import gradkit.optim as go

torch.manual_seed(0)
assert torch.cuda.is_available(), "no CUDA"
dev = "cuda"
SHAPES = [(64, 32), (32,), (128, 128), (8, 3, 5, 5), (1000, 256)]


def make(device, dtype, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
             for _ in range(steps)]
    params = [torch.nn.Parameter(p.to(device, dtype)) for p in params]
    grads = [[x.to(device, dtype) for x in gs] for gs in grads]
    return params, grads


def run(cls, kw, device, dtype, steps=20):
    params, grads = make(device, dtype, steps)
    opt = cls(params, **kw)
    for t in range(steps):
        for p, gr in zip(params, grads[t]):
            p.grad = gr.clone()
        opt.step()
        if t == 10:
            for group in opt.param_groups:
                group["lr"] = group["lr"] * 0.5
    return [p.detach().cpu().double() for p in params], opt


CASES = [
    ("DiffGrad", go.DiffGrad, dict(lr=1e-2, weight_decay=1e-2), True),
    ("AdamP", go.AdamP, dict(lr=1e-2, weight_decay=1e-2), True),
    ("SGDP", go.SGDP, dict(lr=1e-2, momentum=0.9, weight_decay=1e-4), True),
    ("AdaGradNorm", go.AdaGradNorm, dict(lr=1e-1), False),
]
for name in ("MFAC",):
    if hasattr(go, name):
        CASES.append((name, getattr(go, name), dict(lr=1e-2), False))

failures = 0
for name, cls, kw, has_fused in CASES:
    ref, _ = run(cls, dict(kw, foreach=False), "cpu", torch.float64)
    paths = [("loop", dict(foreach=False)), ("foreach", dict(foreach=True)),
             ("default", {})]
    if has_fused:
        paths.append(("fused", dict(fused=True)))
    for path, extra in paths:
        t0 = time.perf_counter()
        try:
            got, opt = run(cls, dict(kw, **extra), dev, torch.float32)
        except Exception as e:  # report every failure, keep going
            print(f"{name:12s} {path:8s} FAILED: {type(e).__name__}: {e}")
            failures += 1
            continue
        err = max(((a - b).abs().max() / (b.abs().max() + 1e-12)).item()
                  for a, b in zip(got, ref))
        ok = err < 1e-4
        failures += not ok
        print(f"{name:12s} {path:8s} cuda fp32 vs cpu fp64: max rel err {err:.2e} "
              f"{'ok' if ok else 'MISMATCH'}  ({time.perf_counter() - t0:.2f}s)")
    # float64 on CUDA against float64 on CPU, loop path: should agree to ~1e-12
    got64, _ = run(cls, dict(kw, foreach=False), dev, torch.float64)
    err64 = max((a - b).abs().max().item() for a, b in zip(got64, ref))
    failures += err64 > 1e-10
    print(f"{name:12s} loop     cuda fp64 vs cpu fp64: max abs err {err64:.2e}")

print("FAILURES:", failures)
sys.exit(1 if failures else 0)
