"""The shared optimizer base (gradkit.optim._base, _fused, gradkit._checks) as DiffGrad, AdamP
and SGDP use it: torch's wording and contract where torch defines it, a compiled path that
survives a long-lived process, and the docstring examples."""

from __future__ import annotations

import copy
import doctest

import pytest
import torch
from torch import nn

from gradkit.optim import SGDP, AdamP, DiffGrad

CLASSES = [(DiffGrad, {}), (AdamP, {}), (SGDP, {"lr": 0.1})]
class_param = pytest.mark.parametrize(("cls", "base"), CLASSES,
                                      ids=[c.__name__ for c, _ in CLASSES])
PATHS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def _torch_message(**kwargs) -> str:
    with pytest.raises(ValueError) as err:
        torch.optim.Adam([nn.Parameter(torch.zeros(1))], **kwargs)
    return str(err.value)


@class_param
@pytest.mark.parametrize("kwargs", [{"lr": -1.0}, {"eps": -0.1}, {"weight_decay": -1.0},
                                    {"betas": (1.0, 0.999)}, {"betas": (0.9, -0.5)}],
                         ids=["lr", "eps", "weight_decay", "beta0", "beta1"])
def test_invalid_arguments_raise_torchs_own_message(cls, base, kwargs):
    if "betas" in kwargs and cls is SGDP:
        pytest.skip("SGDP has no betas")
    with pytest.raises(ValueError) as err:
        cls([nn.Parameter(torch.zeros(2, 2))], **{**base, **kwargs})
    assert str(err.value) == _torch_message(**kwargs)


def test_sgdp_takes_its_lr_from_the_param_groups_alone():
    """As in torch.optim and the authors' SGDP, lr may be given per group only."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (4,)]
    inits = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
             for _ in range(3)]
    ours = [nn.Parameter(t.clone()) for t in inits]
    alone = [nn.Parameter(t.clone()) for t in inits]
    opt = SGDP([{"params": [ours[0]], "lr": 0.1}, {"params": [ours[1]], "lr": 0.01}],
               momentum=0.9)
    opts = [SGDP([alone[0]], lr=0.1, momentum=0.9), SGDP([alone[1]], lr=0.01, momentum=0.9)]
    for gs in grads:
        for p, q, g in zip(ours, alone, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        for o in opts:
            o.step()
    for p, q in zip(ours, alone):
        assert torch.equal(p, q)
    assert not torch.equal(ours[0], inits[0])
    with pytest.raises(ValueError, match="lr"):
        SGDP([{"params": [nn.Parameter(torch.zeros(2))]}])


def _train(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("cls", [DiffGrad, AdamP], ids=["DiffGrad", "AdamP"])
def test_state_dict_with_python_number_steps_loads_and_resumes(cls, path):
    """Other packages save ``step`` as a Python number; loading converts it (as torch's Adam
    does), and the resumed run equals the uninterrupted one bitwise."""
    dtype = torch.float32 if path == "fused" else torch.float64
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (4,)]
    inits = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(6)]
    full = [nn.Parameter(t.clone()) for t in inits]
    _train(cls(full, lr=1e-2, **PATHS[path]), full, grads)
    first = [nn.Parameter(t.clone()) for t in inits]
    opt = cls(first, lr=1e-2, **PATHS[path])
    _train(opt, first, grads[:3])
    saved = copy.deepcopy(opt.state_dict())
    for state in saved["state"].values():
        state["step"] = int(state["step"].item())
    resumed = [nn.Parameter(p.detach().clone()) for p in first]
    fresh = cls(resumed, lr=1e-2, **PATHS[path])
    fresh.load_state_dict(saved)
    assert all(torch.is_tensor(fresh.state[p]["step"]) for p in resumed)
    _train(fresh, resumed, grads[3:])
    for a, b in zip(resumed, full):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("name", "package", "kwargs"), [
    ("DiffGrad", "torch_optimizer", {"lr": 1e-2, "weight_decay": 0.01}),
    ("AdamP", "adamp", {"lr": 1e-2, "weight_decay": 0.1}),
])
def test_resumes_from_the_reference_packages_state_dict(name, package, kwargs):
    """A run started with the reference package continues in gradkit (same state keys; the
    package stores ``step`` as an int) exactly as it would have in the package."""
    module = pytest.importorskip(package)
    ours_cls = {"DiffGrad": DiffGrad, "AdamP": AdamP}[name]
    gen = torch.Generator().manual_seed(1)
    shapes = [(4, 6), (6,)]
    inits = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
             for _ in range(10)]
    theirs = [nn.Parameter(t.clone()) for t in inits]
    their_opt = getattr(module, name)(theirs, **kwargs)
    _train(their_opt, theirs, grads[:5])
    ours = [nn.Parameter(p.detach().clone()) for p in theirs]
    opt = ours_cls(ours, **kwargs)
    opt.load_state_dict(copy.deepcopy(their_opt.state_dict()))  # as if saved to disk
    _train(their_opt, theirs, grads[5:])
    _train(opt, ours, grads[5:])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_fused_paths_never_hit_the_recompile_limit_across_dtypes():
    """Each kernel variant (dtype, flags) compiles into its own cache, so a long-lived process
    with many dtypes never reaches torch.compile's per-function limit, where ``fullgraph=True``
    raises ``FailOnRecompileLimitHit``. With the limit lowered to 2, four dtypes sharing one
    cache would exceed it."""
    with torch._dynamo.config.patch(recompile_limit=2):
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            for cls, base in ((AdamP, {}), (SGDP, {"lr": 0.1})):
                weight = nn.Parameter(torch.randn(5, 3, dtype=dtype))
                weight.grad = torch.randn_like(weight)
                before = weight.detach().clone()
                cls([weight], fused=True, **base).step()
                assert torch.isfinite(weight).all() and not torch.equal(weight, before)


@pytest.mark.parametrize("cls", [AdamP, SGDP, DiffGrad], ids=lambda c: c.__name__)
def test_docstring_example_runs_and_prints_what_it_shows(cls):
    tests = doctest.DocTestFinder(recurse=False).find(cls, cls.__name__, globs={})
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted >= 5 and result.failed == 0
