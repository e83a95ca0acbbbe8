"""Per-example gradients with ``torch.func`` (``functional_call`` + ``vmap(grad)``), chunked.

``per_example_grads(model, loss_fn, inputs, targets)`` returns ``{name: (B, *shape)}``, the
gradient of each example's own loss ``loss_fn(model(x_i[None]), y_i[None])``. For a
mean-reduced ``loss_fn`` their average is the mini-batch gradient.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

LossFn = Callable[[Tensor, Tensor], Tensor]


def train_mode_batchnorm(model: nn.Module) -> str | None:
    """The name of the first BatchNorm module in train mode, or None."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            return name or type(module).__name__
    return None


def check_per_example_safe(model: nn.Module) -> None:
    """Refuse modules whose train-mode forward mixes examples (BatchNorm in train mode)."""
    name = train_mode_batchnorm(model)
    if name is not None:
        raise RuntimeError(
            f"module '{name}' is a BatchNorm in train mode: its "
            "batch statistics mix examples, so per-example gradients are undefined. Put it "
            "in eval mode (module.eval()) for the measurement, or use GroupNorm/LayerNorm."
        )


def _select(model: nn.Module, names: Iterable[str] | None) -> dict[str, Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if names is None:
        return {n: p.detach() for n, p in params.items()}
    names = list(names)
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"unknown parameter name(s) {unknown}; trainable: {list(params)}")
    return {n: params[n].detach() for n in names}


def _vmap_grads(model, loss_fn, inputs, targets, params, chunk_size, randomness):
    others = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    buffers = dict(model.named_buffers())

    def example_loss(chosen, x, y):
        out = functional_call(model, ({**others, **chosen}, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0), chunk_size=chunk_size,
                       randomness=randomness)
    return per_example(params, inputs, targets)


def _loop_grads(model, loss_fn, inputs, targets, params):
    names = list(params)
    live = dict(model.named_parameters())
    rows: list[tuple[Tensor, ...]] = []
    for x, y in zip(inputs, targets):
        with torch.enable_grad():
            loss = loss_fn(model(x.unsqueeze(0)), y.unsqueeze(0))
            rows.append(torch.autograd.grad(loss, [live[n] for n in names], allow_unused=True))
    out = {}
    for i, n in enumerate(names):
        out[n] = torch.stack([
            r[i] if r[i] is not None else torch.zeros_like(live[n]) for r in rows
        ])
    return out


def per_example_grads(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: Iterable[str] | None = None,
    chunk_size: int | None = 256,
    method: Literal["auto", "vmap", "loop"] = "auto",
    randomness: Literal["error", "different", "same"] = "error",
) -> dict[str, Tensor]:
    """Gradients of each example's loss, ``{param name: tensor of shape (B, *param.shape)}``.

    Args:
        model: the network; its parameters and buffers are read, never modified.
        loss_fn: ``loss_fn(outputs, targets)`` on a batch (called on batches of one).
        inputs, targets: the batch; dimension 0 indexes examples.
        params: names of the parameters to differentiate (default: all trainable).
        chunk_size: examples per vmap chunk, to bound memory (``None``: all at once).
        method: ``"vmap"`` (torch.func), ``"loop"`` (one autograd call per example, works for
            any module), or ``"auto"`` (vmap, falling back to the loop with a warning when a
            module cannot be vmapped).
        randomness: passed to ``vmap``; the default refuses random ops (e.g. Dropout in train
            mode) so the measurement never consumes the global RNG.

    Raises:
        RuntimeError: a BatchNorm module is in train mode.
    """
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs and targets disagree on the batch size: {inputs.shape[0]} vs "
            f"{targets.shape[0]}"
        )
    if method not in ("auto", "vmap", "loop"):
        raise ValueError(f"Invalid method: {method!r} (use 'auto', 'vmap' or 'loop')")
    check_per_example_safe(model)
    chosen = _select(model, params)
    if method == "loop":
        return _loop_grads(model, loss_fn, inputs, targets, chosen)
    try:
        return _vmap_grads(model, loss_fn, inputs, targets, chosen, chunk_size, randomness)
    except (RuntimeError, NotImplementedError) as exc:
        if method == "vmap":
            raise
        warnings.warn(
            f"vmap could not compute per-example gradients ({exc}); falling back to a loop "
            "over examples (slower, same result)",
            RuntimeWarning,
            stacklevel=2,
        )
        return _loop_grads(model, loss_fn, inputs, targets, chosen)
