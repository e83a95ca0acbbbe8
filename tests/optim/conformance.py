"""A generic torch.optim-behaviour battery (conventions.md §1) for gradkit optimizers.

Add an optimizer by appending one :class:`Case` to :data:`CASES`; ``test_conformance.py``
runs every check on every case. A case gives the hyperparameters the battery trains with, an
alternative value for every non-bool hyperparameter (the "flag changes the trajectory or
raises" check covers bools automatically), the expected state keys, and invalid arguments
that must raise ``ValueError`` with a message naming them.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradkit.optim import SGDP, AdaGradNorm, AdamP, DiffGrad, _fused

IMPL_FLAGS = ("foreach", "fused")


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    factory: Callable[..., torch.optim.Optimizer]
    registry_name: str
    kwargs: dict[str, Any]  # hyperparameters used by the battery (lr must be included)
    alternatives: dict[str, Any]  # non-bool hyperparameter -> a value that changes the steps
    state_keys: frozenset[str]
    invalid: tuple[tuple[dict[str, Any], str], ...]  # (kwargs, substring of ValueError message)
    smoke_kwargs: dict[str, Any]  # hyperparameters for the Rosenbrock / quadratic smoke tests
    paths: tuple[str, ...] = ("loop", "foreach", "fused")


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
    Case(  # wave 2 (AdaGradNorm); Muon/DropMuon, PerpGrad/SAM, M3/RM3/RA3 are covered in
        # their own test files (aux-AdamW lr, wrapper signatures, closure, delayed updates)
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


def make_optimizer(case: Case, params, path: str = "loop", **overrides: Any):
    kwargs = {**case.kwargs, **overrides}
    if path == "foreach":
        kwargs["foreach"] = True
    elif path == "fused":
        kwargs["fused"] = True
    else:
        kwargs.setdefault("foreach", False)
    return case.factory(params, **kwargs)


def train(case: Case, steps: int, path: str = "loop", *, dtype=torch.float64,
          model: TinyNet | None = None, opt=None, start: int = 0,
          **overrides: Any) -> tuple[TinyNet, torch.optim.Optimizer]:
    model = TinyNet(dtype) if model is None else model
    opt = make_optimizer(case, model.parameters(), path, **overrides) if opt is None else opt
    for t in range(start, start + steps):
        opt.zero_grad()
        model.loss(t).backward()
        opt.step()
    return model, opt


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def signature_hyperparameters(case: Case) -> dict[str, Any]:
    """Keyword hyperparameters of the constructor with their defaults (``params`` excluded)."""
    sig = inspect.signature(case.factory.__init__)
    return {name: p.default for name, p in sig.parameters.items()
            if name not in ("self", "params")}


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
