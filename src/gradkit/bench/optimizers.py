"""Optimizer specs for the benchmark: the declared default set and user optimizers.

An :class:`OptimizerSpec` is everything the protocol needs to know about a contender: where
the class comes from (a :mod:`gradkit.optim` registry name or ``package.module:Class``), its
declared search space, the constant keyword arguments, and an optional *param-group builder*
(``"module:function"``, called as ``builder(model) -> list[dict]``) for optimizers that treat
parameters differently (Muon: hidden matrices vs auxiliary AdamW).

Search-space rule (the same for everyone): the learning rate is searched log-uniformly over
three decades. The declared table below fixes the range per optimizer family; any other
optimizer (a registry name outside the table, or a user class) gets the three decades centred
on its constructor's default ``lr`` (``1e-3`` if it has none). The *defaults* trial uses the
constructor's default ``lr`` (or the range's geometric centre if the constructor has none) and
the declared constant keywords.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from gradkit.bench._imports import is_import_spec, load_attr
from gradkit.bench.search import LogUniform, sample
from gradkit.errors import UsageError


@dataclass(frozen=True)
class TableEntry:
    """One row of the declared default optimizer set."""

    name: str
    lr: tuple[float, float]
    fixed: dict[str, Any] = field(default_factory=dict)
    param_groups: str | None = None
    tied: dict[str, float] = field(default_factory=dict)


#: The default contenders (``gradkit bench`` with no ``--optimizer``). Names not registered
#: in :mod:`gradkit.optim` at run time are skipped with a note.
DEFAULT_TABLE: tuple[TableEntry, ...] = (
    TableEntry("sgd", (1e-3, 1.0), {"momentum": 0.9}),
    TableEntry("adam", (1e-4, 1e-1)),
    TableEntry("adamw", (1e-4, 1e-1)),
    TableEntry("diffgrad", (1e-4, 1e-1)),
    TableEntry("adamp", (1e-4, 1e-1)),
    TableEntry("sgdp", (1e-3, 1.0), {"momentum": 0.9}),
    # Muon's auxiliary AdamW lr follows the searched Muon lr at the ratio of their defaults
    # (3e-4 / 0.02), so tuning also tunes the AdamW part (all of it on 1-D workloads).
    TableEntry("muon", (2e-3, 2.0), param_groups="gradkit.optim:muon_param_groups",
               tied={"adamw_lr": 0.015}),
    # Drop-Muon: one layer per module that owns parameters, the same tied AdamW lr as Muon.
    TableEntry("dropmuon", (2e-3, 2.0), param_groups="gradkit.optim:drop_muon_layer_groups",
               tied={"adamw_lr": 0.015}),
    # AdaGrad-Norm's step is scale-free (lr / b with b the norm of the summed squared
    # gradient norms), so its lr is a distance: a wider range, same number of decades + 1.
    TableEntry("adagradnorm", (1e-3, 10.0)),
    # Wrappers share the SGD baseline's base configuration (momentum 0.9), so the comparison
    # isolates what the wrapper adds. SAM costs two gradients per step: the seconds-based
    # score shows that price, the step-based score does not.
    TableEntry("sam", (1e-3, 1.0), {"base": "sgd", "momentum": 0.9, "rho": 0.05}),
    TableEntry("perpgrad", (1e-3, 1.0), {"base": "sgd", "momentum": 0.9}),
    TableEntry("rm3", (1e-3, 1.0)),
)
_TABLE = {entry.name: entry for entry in DEFAULT_TABLE}


@dataclass(frozen=True)
class OptimizerSpec:
    """A resolved contender: class, search space, constants and param-group builder."""

    name: str
    factory: Callable[..., torch.optim.Optimizer]
    search: dict[str, LogUniform]
    defaults: dict[str, float]
    fixed: dict[str, Any]
    param_groups: str | None = None
    tied: dict[str, float] = field(default_factory=dict)

    @property
    def is_torch_baseline(self) -> bool:
        """True for classes from ``torch.optim`` (the speedup baselines)."""
        return getattr(self.factory, "__module__", "").startswith("torch.optim")

    def configs(self, n_trials: int, seed: int) -> list[dict[str, Any]]:
        """The defaults trial followed by ``n_trials`` quasi-random configurations."""
        points = [self.defaults, *sample(self.search, n_trials, seed)]
        tie = {k: (lambda p, r=r: float(f"{r * p['lr']:.4g}")) for k, r in self.tied.items()}
        return [{**self.fixed, **p, **{k: f(p) for k, f in tie.items()}} for p in points]

    def describe_space(self) -> str:
        parts = [f"{k} ~ {v.describe()}" for k, v in sorted(self.search.items())]
        parts += [f"{k}={v!r}" for k, v in sorted(self.fixed.items())]
        parts += [f"{k}={r:g}·lr" for k, r in sorted(self.tied.items())]
        parts += [f"defaults trial: {self.defaults}"]
        if self.param_groups:
            parts.append(f"param groups: {self.param_groups}")
        return "; ".join(parts)

    def build(self, model: nn.Module, hparams: dict[str, Any]) -> torch.optim.Optimizer:
        params: Iterable[Any] = model.parameters()
        if self.param_groups:
            params = load_attr(self.param_groups, "param-group builder")(model)
        return self.factory(params, **hparams)


def _default_of(factory: Callable[..., Any], name: str) -> float | None:
    """The constructor's default for keyword ``name`` if it is a positive finite number."""
    try:
        parameter = inspect.signature(factory).parameters.get(name)
    except (TypeError, ValueError):
        return None
    if parameter is None or parameter.default is inspect.Parameter.empty or isinstance(
            parameter.default, bool):
        return None
    try:
        value = float(parameter.default)
    except (TypeError, ValueError):
        return None
    return value if value > 0 and math.isfinite(value) else None


def _spec(name: str, factory: Callable[..., Any], entry: TableEntry | None) -> OptimizerSpec:
    lr0 = _default_of(factory, "lr")
    if entry is not None:
        space = LogUniform(*entry.lr)
        fixed, groups, tied = dict(entry.fixed), entry.param_groups, dict(entry.tied)
    else:
        centre = lr0 or 1e-3
        space = LogUniform(float(f"{centre / 10**1.5:.4g}"), float(f"{centre * 10**1.5:.4g}"))
        fixed, groups, tied = {}, None, {}
    if lr0 is None:
        lr0 = float(f"{math.sqrt(space.low * space.high):.4g}")
    return OptimizerSpec(name, factory, {"lr": space}, {"lr": lr0}, fixed, groups, tied)


def registry_names() -> list[str]:
    """Names currently registered in :mod:`gradkit.optim`."""
    from gradkit import optim

    return optim.available()


def split_settings(source: str) -> tuple[str, str | None]:
    """``"adamw:lr=1e-4..1e-1"`` -> ``("adamw", "lr=1e-4..1e-1")``; the settings part is the
    text after the last colon when it contains ``=`` (``pkg.mod:Class:wd=0.1`` works too)."""
    head, sep, tail = source.rpartition(":")
    if sep and "=" in tail:
        return head, tail
    return source, None


def parse_settings(text: str, origin: str) -> tuple[dict[str, Any], dict[str, LogUniform]]:
    """``"weight_decay=0.1,lr=1e-4..1e-1"`` -> (fixed values, log-uniform search ranges).

    A value is a number, ``true``/``false``, or ``LOW..HIGH`` (searched log-uniformly).
    """
    fixed: dict[str, Any] = {}
    search: dict[str, LogUniform] = {}
    for item in text.split(","):
        name, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not name.isidentifier() or not value:
            raise UsageError(f"optimizer {origin!r}: malformed setting {item.strip()!r}; expected "
                             "NAME=VALUE or NAME=LOW..HIGH, comma-separated")
        if name in fixed or name in search:
            raise UsageError(f"optimizer {origin!r}: {name!r} is set twice")
        if ".." in value:
            low, high = (_number(v, origin, name) for v in value.split("..", 1))
            try:
                search[name] = LogUniform(float(low), float(high))
            except ValueError:
                raise UsageError(f"optimizer {origin!r}: {name}={value} must be a range "
                                 "0 < LOW <= HIGH (searched log-uniformly)") from None
        elif value.lower() in ("true", "false"):
            fixed[name] = value.lower() == "true"
        else:
            fixed[name] = _number(value, origin, name)
    return fixed, search


def _number(text: str, origin: str, name: str) -> int | float:
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise UsageError(f"optimizer {origin!r}: {name}={text!r} is not a number") from None
    if not math.isfinite(value):
        raise UsageError(f"optimizer {origin!r}: {name}={text!r} must be finite")
    return value


def _accepted(factory: Callable[..., Any]) -> set[str] | None:
    """Keyword names the optimizer's constructor accepts (None: anything, via **kwargs)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.name != "params"}


def _with_settings(spec: OptimizerSpec, settings: str, source: str) -> OptimizerSpec:
    """``spec`` with command-line settings: fixed values replace searched ones and vice versa."""
    fixed, search = parse_settings(settings, source)
    accepted = _accepted(spec.factory)
    if accepted is not None:
        unknown = sorted((set(fixed) | set(search)) - accepted)
        if unknown:
            raise UsageError(f"optimizer {source!r}: {spec.factory.__name__} takes no "
                             f"{', '.join(unknown)} (it takes {', '.join(sorted(accepted))})")
    new_search = {k: v for k, v in spec.search.items() if k not in fixed} | search
    new_fixed = {k: v for k, v in spec.fixed.items() if k not in search} | fixed
    tied = {k: r for k, r in spec.tied.items() if k not in fixed and k not in search}
    if "lr" not in new_search and "lr" in new_fixed:  # a fixed lr fixes what is tied to it
        new_fixed |= {k: float(f"{r * new_fixed['lr']:.4g}") for k, r in tied.items()}
        tied = {}
    defaults = {k: v for k, v in spec.defaults.items() if k in new_search}
    for name, space in search.items():
        if name not in defaults or not space.low <= defaults[name] <= space.high:
            default = _default_of(spec.factory, name)
            defaults[name] = default if default is not None and \
                space.low <= default <= space.high else space.centre()
    return replace(spec, name=source, search=new_search, defaults=defaults, fixed=new_fixed,
                   tied=tied)


def resolve_optimizer(source: str) -> OptimizerSpec:
    """A spec from ``NAME``, ``package.module:Class``, either followed by ``:SETTINGS``.

    ``SETTINGS`` is ``name=value`` (fixed in every trial) or ``name=low..high`` (searched
    log-uniformly instead of the declared range), comma-separated:
    ``adamw:weight_decay=0.1``, ``adamw:lr=1e-4..1e-1,weight_decay=0.01``. One-line
    UsageError if anything is wrong.
    """
    base, settings = split_settings(source)
    if is_import_spec(base):
        cls = load_attr(base, "optimizer")
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise UsageError(
                f"optimizer {base!r} is not a torch.optim.Optimizer subclass (got {cls!r})"
            )
        spec = _spec(base, cls, None)
    else:
        from gradkit import optim

        key = base.lower()
        if key not in optim.available():
            raise UsageError(
                f"unknown optimizer {base!r}; valid: {', '.join(optim.available())} "
                "or package.module:Class"
            )
        spec = _spec(key, optim.get(key), _TABLE.get(key))
    if settings is None:
        return spec
    return _with_settings(spec, settings, f"{spec.name}:{settings.replace(' ', '')}")


def default_optimizers() -> tuple[list[OptimizerSpec], list[str]]:
    """The declared default set that is registered now, and a note per skipped name."""
    available = set(registry_names())
    specs, notes = [], []
    for entry in DEFAULT_TABLE:
        if entry.name not in available:
            notes.append(f"optimizer {entry.name!r} is in the default set but not registered in "
                         "gradkit.optim yet: skipped")
            continue
        if entry.param_groups:
            try:
                load_attr(entry.param_groups, "param-group builder")
            except UsageError:
                notes.append(f"optimizer {entry.name!r}: its param-group builder "
                             f"{entry.param_groups} is not available yet: skipped")
                continue
        specs.append(resolve_optimizer(entry.name))
    return specs, notes
