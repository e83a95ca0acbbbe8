"""The hand-written CPU kernel of fused AdamP (gradkit.optim._native): build, cache,
fallback, threads, and parity with the equations."""

from __future__ import annotations

import pytest
import torch

from gradkit.optim import AdamP, _native
from tests.optim.test_adamp import (
    assert_same_trajectory,
    initial,
    make_grads,
    reference_adamp,
)

# large weights (the native kernel's domain: >= _fused.BIG_NUMEL elements) of every kind,
# beside small and 1-D ones that stay on the torch.compile kernel
SHAPES = [(256, 160), (64, 8, 8, 10), (200, 300), (4, 6), (6,)]
KINDS = ["channel", "layer", "free", "channel", "free"]

needs_compiler = pytest.mark.skipif(_native._compiler() is None, reason="no C compiler")


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """An empty cache directory and a forgotten kernel (rebuilt on first use)."""
    monkeypatch.setenv("GRADKIT_CACHE_DIR", str(tmp_path))
    _native.adamp_kernels.cache_clear()
    yield tmp_path
    _native.adamp_kernels.cache_clear()


def _count_native_calls(monkeypatch) -> dict:
    calls = {"n": 0}
    original = AdamP._native_step

    def counted(self, *args, **kwargs):
        done = original(self, *args, **kwargs)
        calls["n"] += int(done)
        return done

    monkeypatch.setattr(AdamP, "_native_step", counted)
    return calls


@needs_compiler
def test_kernel_is_built_once_into_the_cache(fresh_build):
    assert _native.adamp_kernels() is not None
    built = list((fresh_build / "native").glob("adamp-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert _native._build(_native._compiler(), _native._SOURCE) == built[0]
    assert built[0].stat().st_mtime_ns == stamp  # found, not rebuilt


@needs_compiler
@pytest.mark.parametrize(("nesterov", "maximize"), [(False, False), (True, True)])
def test_native_fused_step_matches_the_equations_in_float64(monkeypatch, nesterov, maximize):
    """``maximize`` gets the negated gradients, so it must retrace the minimizing run."""
    calls = _count_native_calls(monkeypatch)
    kw = dict(lr=1e-2, nesterov=nesterov)
    thetas = initial(shapes=SHAPES)
    params = [torch.nn.Parameter(t.clone()) for t in thetas]
    opt = AdamP(params, weight_decay=0.2, maximize=maximize, fused=True, **kw)
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        for p, g in zip(params, make_grads([p.detach() for p in params], KINDS, gen)):
            p.grad = -g if maximize else g
        opt.step()
    for got, want in zip(params, reference_adamp(thetas, 12, KINDS, wd=0.2, **kw)):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)
    assert calls["n"] == 12 * 3  # the three large weights, every step


@needs_compiler
def test_rows_split_between_threads_give_identical_results():
    thetas = initial(torch.float32, SHAPES)
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            params = [torch.nn.Parameter(t.clone()) for t in thetas]
            opt = AdamP(params, lr=1e-2, weight_decay=0.1, fused=True)
            gen = torch.Generator().manual_seed(0)
            for _ in range(5):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
            results.append([p.detach().clone() for p in params])
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_without_a_compiler_fused_adamp_falls_back_to_torch_compile(fresh_build, monkeypatch):
    monkeypatch.setattr(_native, "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert _native.adamp_kernels() is None
    calls = _count_native_calls(monkeypatch)
    assert_same_trajectory(lambda ps: AdamP(ps, lr=1e-2, weight_decay=0.1, fused=True),
                           lambda *a: reference_adamp(*a, lr=1e-2, wd=0.1),
                           initial(torch.float32, SHAPES), 4, KINDS, rtol=1e-5, atol=1e-6)
    assert calls["n"] == 0


def test_a_failing_build_is_reported_and_not_cached(fresh_build, monkeypatch):
    monkeypatch.setattr(_native, "_compiler", lambda: "/bin/false")
    with pytest.warns(RuntimeWarning):
        assert _native.adamp_kernels() is None
    assert not list((fresh_build / "native").glob("*.so*"))  # no partial file left


def test_env_switch_disables_the_native_kernel(fresh_build, monkeypatch):
    monkeypatch.setenv("GRADKIT_NATIVE", "0")
    calls = _count_native_calls(monkeypatch)
    p = torch.nn.Parameter(torch.randn(256, 160))
    p.grad = torch.randn_like(p)
    AdamP([p], lr=1e-2, fused=True).step()
    assert _native.adamp_kernels() is None
    assert calls["n"] == 0
    assert not list(fresh_build.glob("**/*.so"))  # nothing was built


@needs_compiler
@pytest.mark.parametrize("kind", ["channel", "layer", "free", "zero row"])
def test_decision_matches_the_torch_projection(kind):
    """The C decision from row sums equals gradkit.optim._projection's branch-free one."""
    from gradkit.optim._projection import projection_coefficients

    gen = torch.Generator().manual_seed(5)
    p = torch.randn(12, 30, generator=gen, dtype=torch.float64)
    if kind == "zero row":
        p[3] = 0.0
    g = make_grads([p + (p == 0)], ["free" if kind == "free" else
                                    "layer" if kind == "layer" else "channel"], gen)[0]
    g = g * (p != 0)
    u = torch.randn(12, 30, generator=gen, dtype=torch.float64)
    sums = torch.stack([(p * p).sum(1), (g * g).sum(1), (g * p).sum(1), (p * u).sum(1)])
    coef, hit = _native.adamp_kernels().decide(sums.contiguous(), 30, 0.01, 1e-8)
    want, ok = projection_coefficients(p[None], g[None], u[None], 0.01, 1e-8)
    assert hit == bool(ok[0]) == (kind != "free")
    torch.testing.assert_close(coef, want.reshape(-1), rtol=1e-12, atol=1e-15)


@needs_compiler
def test_native_step_bumps_autograd_version_counters(monkeypatch):
    """Raw-pointer writes must still invalidate graphs that saved the weight."""
    calls = _count_native_calls(monkeypatch)
    p = torch.nn.Parameter(torch.randn(256, 160))
    p.grad = torch.randn_like(p)
    opt = AdamP([p], lr=1e-2, fused=True)
    opt.step()
    m = opt.state[p]["exp_avg"]
    before = (p._version, m._version)
    opt.step()
    assert calls["n"] == 2
    assert p._version > before[0] and m._version > before[1]
