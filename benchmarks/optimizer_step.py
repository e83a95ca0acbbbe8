"""Time ``optimizer.step()`` of gradkit's DiffGrad / AdamP / SGDP against torch.optim.Adam and
the anchor packages (pytorch_optimizer, torch_optimizer).

    .venv/bin/python benchmarks/optimizer_step.py            # regimes a, b, c (a few minutes)
    .venv/bin/python benchmarks/optimizer_step.py --quick    # regimes a, b; short windows

Method: fp32 ``nn.Parameter``s with a fixed random ``.grad`` set once (no forward/backward);
weight_decay=0, maximize=False, float lr, same betas/eps everywhere. Before timing, every
gradkit path is checked in float64 over K=10 steps against each anchor's implementation of the
same method (``assert_close`` of parameters and state); where an anchor implements a different
variant, that is printed and the check falls back to an independent float64 reference written
here from the equations. Timing: ``torch.utils.benchmark.Timer.blocked_autorange`` windows,
interleaved across all candidates in shuffled order for several rounds, gc disabled; median
and IQR over all blocks. The first step (state allocation, and compilation for fused paths) is
timed separately, and fused paths are re-timed after changing ``param_group['lr']`` with a
check that nothing recompiled. For AdamP / SGDP, half of the 2-D tensors get gradients
orthogonal to each weight row (as for weights followed by normalisation), so the projection
fires there as it does in real networks.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

REGIMES = {
    "a": ("1000 x 256", [(16, 16)] * 1000),
    "b": ("100 x 256^2", [(256, 256)] * 100),
    "c": ("8 x 2048^2", [(2048, 2048)] * 8),
    "d": ("small transformer mix", (
        [(1000, 256)] + [(768, 256), (768,), (256, 256), (256,), (1024, 256), (1024,),
                         (256, 1024), (256,), (256,), (256,), (256,), (256,)] * 4)),
}
# bytes moved per parameter per step by the minimal algorithm (reads + writes, fp32)
BYTES_PER_PARAM = {"Adam": 28, "DiffGrad": 36, "AdamP": 28, "SGDP": 20}


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--regimes", default="abc", help="subset of 'abcd' (d = transformer mix)")
    ap.add_argument("--methods", default="DiffGrad,AdamP,SGDP")
    ap.add_argument("--quick", action="store_true", help="regimes a,b; 3 short rounds")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (>= 5)")
    ap.add_argument("--window", type=float, default=0.25, help="seconds per timing window")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--cold-compile", action="store_true",
                    help="use an empty inductor cache so first-step times include full compiles")
    ap.add_argument("--profile", action="store_true", help="count aten ops per step")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.regimes = "ab" if args.regimes == "abc" else args.regimes
        args.rounds, args.window = 3, 0.08
    return args


ARGS = _parse()
if ARGS.threads is not None:  # must happen before torch starts its thread pools
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(ARGS.threads)
if ARGS.cold_compile:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gk_inductor_")

import torch  # noqa: E402
from torch.utils import benchmark  # noqa: E402

from gradkit.optim import SGDP, AdamP, DiffGrad, _fused  # noqa: E402

if ARGS.threads is not None:
    torch.set_num_threads(ARGS.threads)

try:
    import pytorch_optimizer as po
except ImportError:  # pragma: no cover - reported in the output
    po = None
try:
    import torch_optimizer as to
except ImportError:  # pragma: no cover
    to = None

LR = {"DiffGrad": 1e-3, "AdamP": 1e-3, "SGDP": 1e-3, "Adam": 1e-3}
SGDP_MOMENTUM = 0.9


# ------------------------------------------------------------------------- candidates
@dataclass
class Candidate:
    method: str  # DiffGrad / AdamP / SGDP / Adam
    label: str  # e.g. "gradkit fused", "pytorch_optimizer"
    build: Callable[[list], torch.optim.Optimizer]
    gradkit_path: str | None = None
    anchor: bool = False
    opt: torch.optim.Optimizer | None = None
    first_step_s: float = float("nan")
    times: list[float] = field(default_factory=list)
    note: str = ""


def candidates(methods: list[str]) -> list[Candidate]:
    out = [Candidate("Adam", f"torch.optim.Adam {name}",
                     lambda ps, kw=kw: torch.optim.Adam(ps, lr=LR["Adam"], **kw))
           for name, kw in (("loop", {"foreach": False}), ("foreach", {"foreach": True}),
                            ("fused", {"fused": True}))]
    ours = {"DiffGrad": lambda ps, **kw: DiffGrad(ps, lr=LR["DiffGrad"], **kw),
            "AdamP": lambda ps, **kw: AdamP(ps, lr=LR["AdamP"], **kw),
            "SGDP": lambda ps, **kw: SGDP(ps, lr=LR["SGDP"], momentum=SGDP_MOMENTUM, **kw)}
    for method in methods:
        for path, kw in (("loop", {"foreach": False}), ("foreach", {"foreach": True}),
                         ("fused", {"fused": True})):
            out.append(Candidate(method, f"gradkit {path}",
                                 lambda ps, f=ours[method], kw=kw: f(ps, **kw), gradkit_path=path))
        for label, build in anchor_builders(method):
            out.append(Candidate(method, label, build, anchor=label.endswith("(default)")))
    return out


def anchor_builders(method: str) -> list[tuple[str, Callable]]:
    lr = LR[method]
    extra = {"momentum": SGDP_MOMENTUM} if method == "SGDP" else {}
    out = []
    if po is not None:
        cls = getattr(po, method)
        out.append(("pytorch_optimizer (default)", lambda ps: cls(ps, lr=lr, **extra)))
        if method != "DiffGrad":  # DiffGrad's default already uses foreach on CPU
            out.append(("pytorch_optimizer foreach=True",
                        lambda ps: cls(ps, lr=lr, foreach=True, **extra)))
    if to is not None:
        tcls = getattr(to, method)
        out.append(("torch_optimizer (default)", lambda ps: tcls(ps, lr=lr, **extra)))
    return out


# ------------------------------------------------------------------ problem construction
def make_problem(shapes, dtype, seed):
    """Parameters with fixed grads; half the 2-D grads orthogonal to each weight row."""
    gen = torch.Generator().manual_seed(seed)
    params, n2d = [], 0
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype))
        g = torch.randn(shape, generator=gen, dtype=dtype)
        if p.ndim > 1:
            n2d += 1
            if n2d % 2:
                rows, grows = p.detach().reshape(shape[0], -1), g.view(shape[0], -1)
                coef = (grows * rows).sum(1, keepdim=True) / (rows * rows).sum(1, keepdim=True)
                grows.sub_(rows * coef)
        p.grad = g
        params.append(p)
    return params


# ------------------------------------------------------- independent float64 references
def _sig(x):
    return 1.0 / (1.0 + torch.exp(-x))


def _project_ref(p, g, u, delta=0.1, eps=1e-8):
    if p.ndim <= 1:
        return u
    for rows in (p.shape[0], 1):
        p2, g2, u2 = p.reshape(rows, -1), g.reshape(rows, -1), u.reshape(rows, -1)
        denom = g2.norm(dim=1).clamp_min(eps) * p2.norm(dim=1).clamp_min(eps)
        if ((g2 * p2).sum(1).abs() / denom).max() < delta / math.sqrt(p2.shape[1]):
            unit = p2 / (p2.norm(dim=1, keepdim=True) + eps)
            return (u2 - unit * (unit * u2).sum(1, keepdim=True)).reshape(p.shape)
    return u


def reference(method: str, thetas, grads, steps):
    """float64 trajectories from the optimizers' docstring equations (wd = 0, defaults)."""
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, LR[method]
    out = []
    for theta, g in zip(thetas, grads):
        theta = theta.clone()
        m, v, prev = torch.zeros_like(theta), torch.zeros_like(theta), torch.zeros_like(theta)
        for t in range(1, steps + 1):
            if method == "SGDP":
                m = SGDP_MOMENTUM * m + g
                m = _project_ref(theta, g, m)  # reference code: the buffer is projected
                theta = theta - lr * m
                continue
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            if method == "DiffGrad":
                xi, prev = _sig((prev - g).abs()), g
                theta = theta - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * xi * m / (
                    v.sqrt() + eps)
            else:
                u = _project_ref(theta, g, m / (v.sqrt() / math.sqrt(1 - b2**t) + eps))
                theta = theta - lr / (1 - b1**t) * u
        out.append(theta)
    return out


def _run64(build, shapes, seed, steps=10):
    params = make_problem(shapes, torch.float64, seed)
    grads = [p.grad.clone() for p in params]
    opt = build(params)
    for _ in range(steps):
        opt.step()
    return [p.detach() for p in params], opt, grads


def _state_of(opt, params):
    keys = ("exp_avg", "exp_avg_sq", "momentum_buffer", "momentum", "previous_grad")
    return [{k: v for k, v in opt.state[p].items() if k in keys} for p in params]


# why an anchor's numbers differ from the authors' code (read from the anchors' sources)
KNOWN_VARIANTS = {
    ("DiffGrad", "pytorch_optimizer"): "uses sqrt(v + 1e-15) + eps as the denominator",
    ("AdamP", "pytorch_optimizer"): "adds eps before the bias correction: (sqrt(v)+eps)/sqrt(bc2)",
    ("SGDP", "pytorch_optimizer"): "keeps the unprojected momentum buffer (the paper's variant; "
                                   "the authors' code stores the projected one)",
}


def parity_check(method: str, shapes, seed: int, cands: list[Candidate]) -> list[str]:
    """K=10 float64 steps: every gradkit path vs each anchor (or vs the reference)."""
    small = shapes[: min(4, len(shapes))]
    lines = []
    ours = [c for c in cands if c.method == method and c.gradkit_path]
    anchors = [c for c in cands if c.method == method and c.gradkit_path is None]
    init = make_problem(small, torch.float64, seed)
    ref = reference(method, [p.detach() for p in init], [p.grad for p in init], 10)
    for c in ours:
        got, opt, _ = _run64(c.build, small, seed)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
        for a in anchors:
            theirs, aopt, _ = _run64(a.build, small, seed)
            try:
                torch.testing.assert_close(got, theirs)
                sa, sb = _state_of(opt, got), _state_of(aopt, theirs)
                for x, y in zip(sa, sb):
                    common = set(x) & set(y) | ({"momentum_buffer"} if "momentum" in y else set())
                    for k in common:
                        torch.testing.assert_close(x[k], y.get(k, y.get("momentum")))
                status = "matches"
            except AssertionError as err:
                worst = max((x - y).abs().max().item() for x, y in zip(got, theirs))
                why = KNOWN_VARIANTS.get((method, a.label.split()[0]), str(err).splitlines()[0])
                status = (f"DIFFERS (max |dθ| {worst:.2e}; {why}): compared with the float64 "
                          "reference instead")
            lines.append(f"  {method:8s} gradkit {c.gradkit_path:7s} vs {a.label:31s} {status}")
        lines.append(f"  {method:8s} gradkit {c.gradkit_path:7s} vs float64 reference (eqs)  "
                     "matches")
    return lines


# --------------------------------------------------------------------------- timing
def time_window(c: Candidate, window: float) -> None:
    timer = benchmark.Timer(stmt="step()", globals={"step": c.opt.step},
                            num_threads=torch.get_num_threads())
    gc.collect()
    gc.disable()
    try:
        m = timer.blocked_autorange(min_run_time=window)
    finally:
        gc.enable()
    c.times.extend(m.times)


def first_step(c: Candidate, params) -> None:
    c.opt = c.build(params)
    t0 = time.perf_counter()
    c.opt.step()
    c.first_step_s = time.perf_counter() - t0


def stats(times: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), q[2] - q[0]


def lr_change_check(c: Candidate, window: float) -> str:
    before = _fused.compile_count()
    for g in c.opt.param_groups:
        g["lr"] = g["lr"] * 0.5
    c.opt.step()
    saved, c.times = c.times, []
    time_window(c, window)
    after_lr, _ = stats(c.times)
    c.times = saved
    ok = _fused.compile_count() == before
    return (f"  {c.method:8s} {c.label:15s} after lr change: {after_lr * 1e6:10.1f} us/step, "
            f"recompiled: {'no' if ok else 'YES'}")


def op_count(c: Candidate) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        c.opt.step()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


# ------------------------------------------------------------------------------ report
def report(regime: str, cands: list[Candidate], numel: int) -> list[str]:
    med = {(c.method, c.label): stats(c.times)[0] for c in cands}
    adam = {p: med.get(("Adam", f"torch.optim.Adam {p}")) for p in ("loop", "foreach", "fused")}
    lines = [f"{'method':8s} {'implementation':31s} {'median us':>11s} {'IQR us':>9s} "
             f"{'ns/param':>8s} {'GB/s':>6s} {'1st step s':>10s}  "
             f"{'/Adam loop':>10s} {'/foreach':>8s} {'/fused':>7s}  {'/pto':>6s} {'/to':>6s}"]
    checks = []
    for c in cands:
        m, iqr = stats(c.times)
        gbs = BYTES_PER_PARAM[c.method] * numel / m / 1e9
        anchors = {lab: med.get((c.method, lab)) for lab in
                   ("pytorch_optimizer (default)", "torch_optimizer (default)")}
        pto, tor = anchors.values()
        ratio = " ".join(f"{m / a:8.2f}" if a else "     n/a" for a in adam.values())
        arat = " ".join(f"{m / a:6.2f}" if a else "   n/a" for a in (pto, tor))
        lines.append(f"{c.method:8s} {c.label:31s} {m * 1e6:11.1f} {iqr * 1e6:9.1f} "
                     f"{m / numel * 1e9:8.2f} {gbs:6.1f} {c.first_step_s:10.3f}  "
                     f"{ratio}  {arat}")
        if c.gradkit_path and pto and tor:
            slow, fast = max(pto, tor), min(pto, tor)
            ok2 = slow / m >= 2.0
            ok1 = m <= fast
            checks.append(f"  {c.method:8s} {c.label:15s} speed-up vs slower anchor "
                          f"{slow / m:6.2f}x [{'PASS' if ok2 else 'MISS'} >= 2x], vs faster "
                          f"anchor {fast / m:6.2f}x [{'PASS' if ok1 else 'MISS'} >= 1x]")
        if c.gradkit_path == "fused" and c.method in ("DiffGrad", "AdamP") and regime == "c":
            r = m / adam["fused"]
            checks.append(f"  {c.method:8s} fused / Adam(fused=True) = {r:.2f} "
                          f"[{'PASS' if r <= 1.5 else 'MISS'} <= 1.5]")
    return [*lines, "targets:", *checks]


def machine_info() -> list[str]:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = torch.__config__.parallel_info().splitlines()
    return [f"torch {torch.__version__}, python {sys.version.split()[0]}, CPU: {cpu}, "
            f"cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
            f"load average at start: {os.getloadavg()[0]:.2f}",
            "parallel_info: " + "; ".join(s.strip() for s in info[1:4])]


def main() -> int:
    random.seed(ARGS.seed)
    methods = [m.strip() for m in ARGS.methods.split(",") if m.strip()]
    print("optimizer step benchmark")
    for line in machine_info():
        print(line)
    print(f"anchors: pytorch_optimizer {'ok' if po else 'MISSING'}, "
          f"torch_optimizer {'ok' if to else 'MISSING'}; rounds={ARGS.rounds}, "
          f"window={ARGS.window}s; ratios are median step time / baseline median "
          "(< 1 = faster); pto = pytorch_optimizer (default), to = torch_optimizer\n")
    for key in ARGS.regimes:
        title, shapes = REGIMES[key]
        numel = sum(math.prod(s) for s in shapes)
        print(f"=== regime ({key}) {title}: {len(shapes)} tensors, {numel / 1e6:.2f}M params, "
              "fp32 ===")
        cands = candidates(methods)
        print("float64 parity check (K=10 steps, up to 4 tensors of this regime):")
        for method in methods:
            for line in parity_check(method, shapes, ARGS.seed, cands):
                print(line)
        params = make_problem(shapes, torch.float32, ARGS.seed)
        checksum = sum(float(p.grad.double().sum()) for p in params)
        for c in cands:
            first_step(c, params)
        for _ in range(ARGS.rounds):
            order = list(cands)
            random.shuffle(order)
            for c in order:
                time_window(c, ARGS.window)
        assert checksum == sum(float(p.grad.double().sum()) for p in params), "grads mutated"
        for line in report(key, cands, numel):
            print(line)
        print("lr change (torch.compile'd fused paths; schedulers must not recompile):")
        for c in cands:
            if c.gradkit_path == "fused":
                print(lr_change_check(c, ARGS.window))
        if ARGS.profile:
            print("aten ops dispatched per step (torch.profiler):")
            for c in cands:
                print(f"  {c.method:8s} {c.label:31s} {op_count(c):8d}")
        print()
        del cands, params
        gc.collect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
