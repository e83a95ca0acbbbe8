"""The bitwise state_dict resume check shared by the optimizer tests outside the conformance
battery (conventions.md §1: 50 steps, save, load into fresh copies, 50 more == 100)."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable

import torch
from torch import nn

Run = Callable[[nn.Module, torch.optim.Optimizer, int, int], None]  # (model, opt, start, n)


def assert_bitwise_resume(
    build_model: Callable[[], nn.Module],
    build_opt: Callable[[nn.Module], torch.optim.Optimizer],
    run: Run,
    steps: int = 50,
    build_fresh_opt: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer, dict]:
    """Train ``2·steps`` uninterrupted vs ``steps`` + save/``torch.load(weights_only=True)``
    into a fresh model and optimizer (``build_fresh_opt``, e.g. with other hyperparameters
    that loading must overwrite) + ``steps``; parameters must be bitwise equal.

    Returns the resumed model, its optimizer and the loaded optimizer state dict.
    """
    model = build_model()
    ref_model = copy.deepcopy(model)
    run(ref_model, build_opt(ref_model), 0, 2 * steps)
    opt = build_opt(model)
    run(model, opt, 0, steps)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = build_model()
    fresh.load_state_dict(loaded["model"])
    fresh_opt = (build_fresh_opt or build_opt)(fresh)
    fresh_opt.load_state_dict(loaded["opt"])
    run(fresh, fresh_opt, steps, steps)
    for a, b in zip(fresh.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(a, b)
    return fresh, fresh_opt, loaded["opt"]


def mse_run(x: torch.Tensor, y: torch.Tensor, *, closure: bool = False) -> Run:
    """A ``run`` that trains on MSE(model(x), y), with ``step(closure)`` when ``closure``."""

    def run(model: nn.Module, opt: torch.optim.Optimizer, start: int, n: int) -> None:
        for _ in range(n):
            if closure:
                opt.step(lambda: nn.functional.mse_loss(model(x), y).backward())
                continue
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    return run
