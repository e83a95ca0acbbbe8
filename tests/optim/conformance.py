"""A generic torch.optim-behaviour battery (conventions.md §1) for gradkit optimizers.

Add an optimizer by appending one :class:`Case` to :data:`CASES`; ``test_conformance.py``
runs every check on every case. A case gives the hyperparameters the battery trains with, an
alternative value for every non-bool hyperparameter (the "flag changes the trajectory or
raises" check covers bools automatically), the expected state keys, and invalid arguments
that must raise ``ValueError`` with a message naming them.

Nothing is skipped silently: what a class legitimately cannot do is declared in its case
(``needs_closure``, ``not_applicable``, ``not_in_defaults``, ``tensor_lr_refused``) with the
reason, and the battery checks the declaration (a closure-only optimizer must refuse
``step()``; a refused tensor lr must raise torch's ``ValueError``; a not-applicable check is
reported as a skip carrying the declared reason). Known defects outside this battery's owner
are declared in ``xfail`` and run as strict xfails.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradkit.optim import (
    M3,
    RA3,
    RM3,
    SAM,
    SGDP,
    AdaGradNorm,
    AdamP,
    DiffGrad,
    DropMuon,
    Muon,
    PerpGrad,
    _fused,
)

IMPL_FLAGS = ("foreach", "fused")

# the checks of test_conformance.py that a case may declare not applicable or xfail
CHECKS = frozenset({
    "hyperparameters_in_defaults", "flags", "paths", "invalid", "torch_messages", "lr_zero",
    "maximize",
    "grad_untouched", "closure", "grad_none", "sparse", "round_trip", "python_step",
    "named_params", "group_lr_only", "tensor_lr", "scheduler", "group_hyperparameters",
    "deepcopy_repr_hooks", "setstate_defaults", "rosenbrock", "quadratic",
})


@dataclasses.dataclass(frozen=True)
class With:
    """An alternative value that needs other settings to matter: the flag check runs the
    baseline with ``context`` and the alternative with ``context`` plus the value."""

    value: Any
    context: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    factory: Callable[..., torch.optim.Optimizer]
    registry_name: str
    kwargs: dict[str, Any]  # hyperparameters used by the battery (lr must be included)
    alternatives: dict[str, Any]  # non-bool hyperparameter -> a value that changes the steps
    state_keys: frozenset[str]  # state keys of TinyNet.weight (and mix)
    invalid: tuple[tuple[dict[str, Any], str], ...]  # (kwargs, substring of ValueError message)
    smoke_kwargs: dict[str, Any]  # hyperparameters for the Rosenbrock / quadratic smoke tests
    updates_every: int = 1  # steps per parameter update (M3/RA3: 3); smoke tests run longer
    paths: tuple[str, ...] = ("loop", "foreach", "fused")
    # TinyNet -> the optimizer's params: default two groups (matrices, rest) without options
    groups: Callable[[TinyNet], list[dict[str, Any]]] | None = None
    needs_closure: bool = False  # step() must raise without a closure; the battery uses one
    warmup: int = 1  # steps before a parameter first moves (M3/RM3/RA3: 3)
    lr_keys: tuple[str, ...] = ("lr",)  # every learning rate (Muon: also the AdamW groups')
    kwargs_of: type | None = None  # **kwargs forwarded to this class (DropMuon -> Muon)
    not_in_defaults: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> why
    impl_flags: tuple[str, ...] = IMPL_FLAGS  # flags that pick a path, not the algorithm
    tensor_lr_refused: frozenset[str] = frozenset()  # paths refusing a Tensor lr, as torch
    not_applicable: dict[str, str] = dataclasses.field(default_factory=dict)  # check -> why
    xfail: dict[str, str] = dataclasses.field(default_factory=dict)  # check -> known defect

    def __post_init__(self) -> None:
        unknown = (set(self.not_applicable) | set(self.xfail)) - CHECKS
        if unknown:
            raise ValueError(f"{self.id}: unknown checks {sorted(unknown)}")


def _muon_groups(model: TinyNet) -> list[dict[str, Any]]:
    return [{"params": [model.weight, model.mix]},
            {"params": [model.bias, model.scale], "use_muon": False}]


_SGD_STATE = frozenset({"momentum_buffer"})
_WRAPPER_NO_DEFAULT = {"base": "the inner optimizer itself (opt.base), not a group option"}
_NORM_PRESERVING = ("⊥Grad removes the radial gradient component, so ||w|| never shrinks; "
                    "the minimiser has a smaller norm than the start")
_MATRICES_ONLY = ("Muon orthogonalises matrices; a 2-vector would run only the auxiliary "
                  "AdamW (tested on the quadratic's 4x5 matrix instead)")
_M_INVALID = (({"lr": -1.0}, "learning rate"), ({"weight_decay": -1.0}, "weight_decay"))


def _three_batch_case(cls: type, name: str, updates_every: int, smoke_lr: float) -> Case:
    return Case(
        id=name, factory=cls, registry_name=name,
        kwargs=dict(lr=5e-2, weight_decay=1e-2),
        alternatives=dict(lr=0.2, weight_decay=0.5),
        state_keys=frozenset({"step", "grad_buffer"}),
        invalid=_M_INVALID, smoke_kwargs=dict(lr=smoke_lr), paths=("loop", "foreach"),
        warmup=3, updates_every=updates_every,
    )


_MUON = Case(
    id="muon",
    factory=Muon,
    registry_name="muon",
    # float64 Newton-Schulz: loop and foreach then agree to rounding (bf16 would amplify)
    kwargs=dict(lr=2e-2, weight_decay=1e-2, adamw_weight_decay=1e-2, ns_dtype="float64"),
    alternatives=dict(lr=5e-2, momentum=0.5, ns_steps=2, weight_decay=0.5, adamw_lr=1e-2,
                      adamw_betas=(0.5, 0.9), adamw_eps=1e-1, adamw_weight_decay=0.5,
                      ns_dtype="float32"),
    state_keys=frozenset({"momentum_buffer"}),
    invalid=(({"lr": -1.0}, "learning rate"), ({"momentum": 1.0}, "momentum"),
             ({"ns_steps": 0}, "ns_steps"), ({"weight_decay": -1.0}, "weight_decay"),
             ({"adamw_betas": (0.9, 1.0)}, "beta"),
             ({"adamw_eps": -1.0}, "Invalid adamw_eps value: -1.0"),
             ({"ns_dtype": "int8"}, "ns_dtype")),
    smoke_kwargs=dict(lr=2e-2, ns_dtype="float64"),
    paths=("loop", "foreach"),
    groups=_muon_groups,
    lr_keys=("lr", "adamw_lr"),
    tensor_lr_refused=frozenset({"foreach"}),
    not_applicable={"rosenbrock": _MATRICES_ONLY},
)


CASES: list[Case] = [
    Case(
        id="diffgrad",
        factory=DiffGrad,
        registry_name="diffgrad",
        kwargs=dict(lr=1e-2, weight_decay=1e-2),
        alternatives=dict(lr=3e-2, betas=(0.5, 0.9), eps=1e-1, weight_decay=0.5),
        state_keys=frozenset({"step", "exp_avg", "exp_avg_sq", "previous_grad"}),
        invalid=(({"lr": -1.0}, "learning rate"), ({"betas": (1.0, 0.9)}, "beta"),
                 ({"eps": -1.0}, "eps"), ({"weight_decay": -1.0}, "weight_decay")),
        smoke_kwargs=dict(lr=2e-2),
    ),
    Case(
        id="adamp",
        factory=AdamP,
        registry_name="adamp",
        kwargs=dict(lr=1e-2, weight_decay=1e-1, delta=0.5),
        alternatives=dict(lr=3e-2, betas=(0.5, 0.9), eps=1e-1, weight_decay=0.9, delta=0.0,
                          wd_ratio=1.0),
        state_keys=frozenset({"step", "exp_avg", "exp_avg_sq"}),
        invalid=(({"lr": -1.0}, "learning rate"), ({"betas": (0.9, -0.1)}, "beta"),
                 ({"eps": -1.0}, "eps"), ({"weight_decay": -1.0}, "weight_decay"),
                 ({"delta": -1.0}, "delta"), ({"wd_ratio": 2.0}, "wd_ratio")),
        smoke_kwargs=dict(lr=2e-2),
    ),
    Case(
        id="sgdp",
        factory=SGDP,
        registry_name="sgdp",
        kwargs=dict(lr=1e-2, momentum=0.5, weight_decay=1e-1, delta=0.5),
        alternatives=dict(lr=3e-2, momentum=0.9, dampening=0.5, weight_decay=0.9, eps=1e-1,
                          delta=0.0, wd_ratio=1.0),
        state_keys=frozenset({"momentum_buffer"}),
        invalid=(({"lr": -1.0}, "learning rate"), ({"momentum": 1.0}, "momentum"),
                 ({"dampening": -0.5}, "dampening"), ({"weight_decay": -1.0}, "weight_decay"),
                 ({"eps": -1.0}, "eps"), ({"delta": -1.0}, "delta"),
                 ({"wd_ratio": 2.0}, "wd_ratio"),
                 ({"nesterov": True, "momentum": 0.0}, "Nesterov")),
        smoke_kwargs=dict(lr=1e-3, momentum=0.9),
    ),
    Case(
        id="adagradnorm",
        factory=AdaGradNorm,
        registry_name="adagradnorm",
        kwargs=dict(lr=5e-2, initial_accumulator_value=0.1, weight_decay=1e-2),
        alternatives=dict(lr=0.2, initial_accumulator_value=2.0, eps=1.0, weight_decay=0.5),
        state_keys=frozenset({"step", "sum"}),
        invalid=(({"lr": -1.0}, "learning rate"), ({"eps": -1.0}, "eps"),
                 ({"initial_accumulator_value": -1.0}, "initial_accumulator_value"),
                 ({"weight_decay": -1.0}, "weight_decay")),
        smoke_kwargs=dict(lr=1.0),
        paths=("loop", "foreach"),
    ),
    _MUON,
    dataclasses.replace(
        _MUON,
        id="dropmuon",
        factory=DropMuon,
        registry_name="dropmuon",
        # the battery's groups are two layers (matrices, rest) and the cutoff is always 0 (both
        # layers step), so every check sees every parameter move; the flag check runs the
        # other probs and seeds (partial cutoffs are tested in test_drop_muon.py)
        kwargs={**_MUON.kwargs, "probs": (1.0, 0.0), "seed": 0},
        alternatives={**_MUON.alternatives, "probs": (0.0, 1.0),
                      "seed": With(3, {"probs": None})},
        invalid=(*_MUON.invalid, ({"probs": (0.5, 0.6)}, "probs"), ({"probs": (1.0,)}, "probs")),
        groups=lambda m: [{**g, "layer": i} for i, g in enumerate(_muon_groups(m))],
        kwargs_of=Muon,
        not_in_defaults={
            "probs": "one cutoff distribution over layers for the whole optimizer (opt.probs)",
            "seed": "seeds opt.generator, whose state is saved in state_dict",
        },
    ),
    Case(
        id="sam",
        factory=SAM,
        registry_name="sam",
        kwargs=dict(base="sgd", lr=5e-2, momentum=0.5, rho=0.05),
        alternatives=dict(base="rmsprop", rho=0.3),
        state_keys=_SGD_STATE,
        invalid=(({"rho": -1.0}, "rho"), ({"lr": -1.0}, "learning rate")),
        smoke_kwargs=dict(base="adam", lr=2e-2, rho=0.01),
        paths=("loop", "foreach"),
        needs_closure=True,
        not_in_defaults=_WRAPPER_NO_DEFAULT,
    ),
    Case(
        id="perpgrad",
        factory=PerpGrad,
        registry_name="perpgrad",
        kwargs=dict(base="sgd", lr=5e-2, momentum=0.5),
        alternatives=dict(base="rmsprop"),
        state_keys=_SGD_STATE,
        invalid=(({"lr": -1.0}, "learning rate"), ({"base": 42}, "base")),
        smoke_kwargs=dict(base="sgd", lr=1e-3),
        paths=("loop", "foreach"),
        not_in_defaults=_WRAPPER_NO_DEFAULT,
        impl_flags=(*IMPL_FLAGS, "perp_foreach"),
        not_applicable={"rosenbrock": _NORM_PRESERVING, "quadratic": _NORM_PRESERVING},
    ),
    _three_batch_case(M3, "m3", updates_every=3, smoke_lr=2e-3),
    # RM3 steps on gradients up to two iterates old: at lr 2e-3 it diverges on Rosenbrock
    _three_batch_case(RM3, "rm3", updates_every=1, smoke_lr=1e-3),
    _three_batch_case(RA3, "ra3", updates_every=3, smoke_lr=2e-3),
]


# ----------------------------------------------------------------------------- helpers
class TinyNet(nn.Module):
    """A weight matrix (projected by AdamP/SGDP), a bias, a 3-D tensor and a 0-d scale."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.weight = nn.Parameter(torch.randn(3, 4, generator=gen, dtype=dtype))
        self.bias = nn.Parameter(torch.randn(3, generator=gen, dtype=dtype))
        self.mix = nn.Parameter(torch.randn(2, 3, 2, generator=gen, dtype=dtype))
        self.scale = nn.Parameter(torch.tensor(1.5, dtype=dtype))

    def loss(self, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(100 + step)
        x = torch.randn(5, 4, generator=gen, dtype=self.weight.dtype)
        h = torch.tanh(x @ self.weight.T + self.bias)
        z = torch.einsum("bi,jik->bjk", h, self.mix) * self.scale
        return (z - 0.3).pow(2).mean() + 0.1 * self.weight.norm()


def param_groups(case: Case, model: TinyNet, *, named: bool = False) -> list[dict[str, Any]]:
    """The case's groups for ``model`` (fresh dicts); ``named``: ``(name, p)`` pairs as
    ``model.named_parameters()`` gives them."""
    if case.groups is not None:
        groups = case.groups(model)
    else:
        groups = [{"params": [model.weight, model.mix]}, {"params": [model.bias, model.scale]}]
    if named:
        names = {id(p): n for n, p in model.named_parameters()}
        groups = [{**g, "params": [(names[id(p)], p) for p in g["params"]]} for g in groups]
    return [dict(g) for g in groups]


def path_kwargs(path: str) -> dict[str, Any]:
    return {"foreach": True} if path == "foreach" else {"fused": True} if path == "fused" else {}


def make_optimizer(case: Case, params, path: str = "loop", **overrides: Any):
    kwargs = {**case.kwargs, **path_kwargs(path), **overrides}
    if path == "loop":
        kwargs.setdefault("foreach", False)
    return case.factory(params, **kwargs)


def make_for(case: Case, model: TinyNet, path: str = "loop", *, named: bool = False,
             **overrides: Any):
    """The case's optimizer over ``model`` (its groups), on ``path``."""
    return make_optimizer(case, param_groups(case, model, named=named), path, **overrides)


GradHook = Callable[[TinyNet], None]


def take_step(case: Case, model: TinyNet, opt: torch.optim.Optimizer, t: int, *,
              sign: float = 1.0, grad_hook: GradHook | None = None):
    """One training step on ``sign * model.loss(t)`` (through a closure when the case needs
    one); ``grad_hook(model)`` may edit the gradients after every backward."""

    def closure():
        opt.zero_grad()
        loss = sign * model.loss(t)
        loss.backward()
        if grad_hook is not None:
            grad_hook(model)
        return loss

    if case.needs_closure:
        return opt.step(closure)
    closure()
    return opt.step()


def train(case: Case, steps: int, path: str = "loop", *, dtype=torch.float64,
          model: TinyNet | None = None, opt=None, start: int = 0, named: bool = False,
          **overrides: Any) -> tuple[TinyNet, torch.optim.Optimizer]:
    model = TinyNet(dtype) if model is None else model
    if opt is None:
        opt = make_for(case, model, path, named=named, **overrides)
    for t in range(start, start + steps):
        take_step(case, model, opt, t)
    return model, opt


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def signature_hyperparameters(case: Case) -> dict[str, Any]:
    """Keyword hyperparameters of the constructor with their defaults (``params`` excluded;
    ``**kwargs`` followed into ``case.kwargs_of``, or dropped for a wrapper's base kwargs)."""
    out: dict[str, Any] = {}
    for cls in (case.factory, case.kwargs_of):
        if cls is None:
            continue
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if name in ("self", "params") or p.kind is inspect.Parameter.VAR_KEYWORD:
                continue
            out.setdefault(name, p.default)
    return out


# ----------------------------------------------------------------------- smoke problems
def rosenbrock(xy: torch.Tensor) -> torch.Tensor:
    x, y = xy[0], xy[1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def ill_conditioned_quadratic(w: torch.Tensor) -> torch.Tensor:
    """0.5 * sum(c_i w_i^2) with condition number 100."""
    c = torch.logspace(0, 2, w.numel(), dtype=w.dtype)
    return 0.5 * (c * w.reshape(-1) ** 2).sum()


def assert_schedule_does_not_recompile(opt: torch.optim.Optimizer, steps: int = 3) -> None:
    """Fused paths: a StepLR schedule (lr changes every step) must re-use the compiled code."""
    compiles = _fused.compile_count()
    lr0 = opt.param_groups[0]["lr"]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    params = [p for group in opt.param_groups for p in group["params"]]
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == lr0 * 0.5**steps
    assert _fused.compile_count() == compiles
