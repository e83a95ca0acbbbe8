r"""Functional Hessian-vector products with ``torch.func``.

.. math::
    \begin{aligned}
        Hv &= \frac{d}{d\epsilon} \nabla_\theta L(\theta + \epsilon v)\Big|_{\epsilon=0}
            &&\text{forward-over-reverse: } \texttt{jvp(grad(L))} \\
        Hv &= \nabla_\theta \big(\nabla_\theta L(\theta)^\top v\big)
            &&\text{reverse-over-reverse: } \texttt{vjp(grad(L))}
    \end{aligned}

Mode "auto" (the default) is reverse-over-reverse through plain autograd: one forward and
one ``create_graph`` backward build the gradient graph (:class:`GradientGraph`), then each
vector costs one double backward through it. It needs only double backward (so it works
where an operation has no forward-mode rule), and ``benchmarks/hessian.py`` measured it
cheaper than forward-over-reverse ``jvp(grad)`` (Pearlmutter's R-operator, mode "fwd-rev",
``vmap``-ed over a block) on CPU: for one vector about the same or better, for a block of 10
about 2x instead of 3.4x a gradient per vector, because the primal forward/backward is shared
and no batched (``vmap``) kernels are needed. Inside a ``torch.func`` transform reverse-over-
reverse is ``vjp(grad)``, ``vmap``-ed over a block. In mode "fwd-rev" a block of ``k``
vectors is handled with ``vmap`` over the tangents (no fallback: it raises where forward
mode is unsupported).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from gradkit.autodiff.flat import FlatParams
from gradkit.curvature._data import require_scalar_loss

LossFn = Callable[[Tensor, Tensor], Tensor]
Mode = Literal["auto", "fwd-rev", "rev-rev"]
ParamDict = dict[str, Tensor]


def fwd_rev_products(fn: Callable[[ParamDict], Tensor], params: ParamDict,
                     tangents: ParamDict) -> ParamDict:
    """Forward-over-reverse ``jvp(grad(fn))`` ``vmap``-ed over tangents ``{name: (k, ...)}``."""
    g = grad(fn)

    def one(t: ParamDict) -> ParamDict:
        return jvp(g, (params,), (t,))[1]

    return vmap(one)(tangents)


class GradientGraph:
    """The gradient of ``fn`` at ``params`` with its autograd graph kept (``create_graph``):
    every :meth:`product` ``H t`` is then one double-backward pass through it.

    Gradient blocks that do not depend on the parameters (no curvature) are stored as
    ``None`` in ``grads`` and give zero products; ``gradient`` is the detached gradient.
    """

    def __init__(self, fn: Callable[[ParamDict], Tensor], params: ParamDict):
        self.names = list(params)
        self.leaves = [params[n].detach().requires_grad_() for n in self.names]
        with torch.enable_grad():
            grads = torch.autograd.grad(fn(dict(zip(self.names, self.leaves))), self.leaves,
                                        create_graph=True, allow_unused=True)
        self.gradient: ParamDict = {
            n: g.detach() if g is not None else torch.zeros_like(leaf.detach())
            for n, g, leaf in zip(self.names, grads, self.leaves)
        }
        self.grads = [g if g is not None and g.requires_grad else None for g in grads]

    def product(self, tangent: Mapping[str, Tensor], *, retain: bool = True) -> ParamDict:
        """``H t`` for ``t = {name: tensor}``; ``retain=False`` frees the graph afterwards."""
        live = [(g, tangent[n]) for g, n in zip(self.grads, self.names) if g is not None]
        prods: Iterable[Tensor | None] = [None] * len(self.names)
        if live:
            prods = torch.autograd.grad([g for g, _ in live], self.leaves,
                                        grad_outputs=[t.reshape(g.shape) for g, t in live],
                                        retain_graph=retain, allow_unused=True)
        return {n: p if p is not None else torch.zeros_like(leaf.detach())
                for n, p, leaf in zip(self.names, prods, self.leaves)}

    def products(self, tangents: Mapping[str, Tensor], *, retain: bool = True) -> ParamDict:
        """``H t_j`` for a block ``{name: (k, *shape)}`` of ``k`` tangents, same layout; one
        double backward per column. ``retain=False`` frees the graph after the last one."""
        k = next(iter(tangents.values())).shape[0]
        outs = [self.product({n: t[j] for n, t in tangents.items()}, retain=retain or j < k - 1)
                for j in range(k)]
        return {n: torch.stack([o[n] for o in outs]) for n in self.names}


def _rev_rev(fn: Callable[[ParamDict], Tensor], params: ParamDict, tangents: ParamDict,
             batched: bool) -> ParamDict:
    """Reverse-over-reverse: one gradient graph, one double backward per vector; inside a
    ``torch.func`` transform (where autograd graphs are not available) ``vjp(grad(fn))``."""
    if not torch._C._functorch.is_functorch_wrapped_tensor(next(iter(params.values()))):
        graph = GradientGraph(fn, params)
        if batched:
            return graph.products(tangents, retain=False)
        return graph.product(tangents, retain=False)
    _, pullback = vjp(grad(fn), params)

    def one(t: ParamDict) -> ParamDict:
        return pullback(t)[0]

    return vmap(one)(tangents) if batched else one(tangents)


def hvp_dict(fn: Callable[[ParamDict], Tensor], params: ParamDict, tangents: ParamDict, *,
             batched: bool = False, mode: Mode = "auto") -> ParamDict:
    """``H t`` of a scalar ``fn(params)``; ``batched`` tangents carry a leading ``k`` dim."""
    if mode not in ("auto", "fwd-rev", "rev-rev"):
        raise ValueError(f"Invalid mode: {mode!r} (use 'auto', 'fwd-rev' or 'rev-rev')")
    if mode == "fwd-rev":
        if batched:
            return fwd_rev_products(fn, params, tangents)
        return jvp(grad(fn), (params,), (tangents,))[1]
    return _rev_rev(fn, params, tangents, batched)


def columns_to_dict(flat: FlatParams, V: Tensor) -> ParamDict:
    """A block ``(n, k)`` as ``{name: (k, *shape)}`` views."""
    return flat.as_dict(V.T)


def dict_to_columns(flat: FlatParams, d: Mapping[str, Tensor]) -> Tensor:
    """``{name: (k, *shape)}`` back to a block ``(n, k)``."""
    k = d[flat.names[0]].shape[0]
    return torch.cat([d[n].reshape(k, -1) for n in flat.names], dim=1).T


def split_params(model: nn.Module, names: Iterable[str] | None) -> tuple[FlatParams, ParamDict,
                                                                       ParamDict]:
    """(layout of the chosen params, chosen {name: detached}, the rest incl. buffers)."""
    if names is None and not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (none has requires_grad=True), "
            "so there is no curvature to measure: unfreeze some, or pass params=[names] to "
            "choose parameters explicitly"
        )
    if names is not None:
        names = list(names)
        if not names:
            raise ValueError("params is empty: pass at least one parameter name (or None for "
                             "all trainable parameters)")
    flat = FlatParams.from_module(model, names)
    chosen = {n: p for n, p in model.named_parameters() if n in set(flat.names)}
    chosen = {n: chosen[n].detach() for n in flat.names}
    rest = {n: p.detach() for n, p in model.named_parameters() if n not in chosen}
    rest.update(dict(model.named_buffers()))
    return flat, chosen, rest


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    v: Tensor | Mapping[str, Tensor],
    params: Iterable[str] | None = None,
    *,
    mode: Mode = "auto",
) -> Tensor | dict[str, Tensor]:
    """Hessian-vector product of ``loss_fn(model(inputs), targets)`` on one batch.

    Args:
        model: the network (read, never modified; its current mode is used as is).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        inputs: the batch's inputs.
        targets: the batch's targets.
        v: a flat vector ``(n,)``, a block ``(n, k)`` of ``k`` vectors as columns, or a
            ``{name: tensor}`` dict shaped like the chosen parameters.
        params: names of the parameters (default: all trainable); the Hessian is the block of
            these parameters.
        mode: "auto" or "rev-rev" (reverse-over-reverse, one gradient graph shared by all
            vectors) or "fwd-rev" (``jvp(grad)``, ``vmap``-ed over a block); see the module
            docstring.

    Returns:
        ``H v`` in the same layout as ``v``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from gradkit.curvature import hvp
        >>> model = nn.Linear(2, 1).double()  # parameters: weight (1, 2), then bias (1,)
        >>> X, Y = torch.randn(4, 2).double(), torch.randn(4, 1).double()
        >>> Hv = hvp(model, nn.functional.mse_loss, X, Y, torch.ones(3).double())
        >>> X1 = torch.cat([X, torch.ones(4, 1).double()], dim=1)  # bias as a constant input
        >>> torch.allclose(Hv, 2 / 4 * X1.T @ X1 @ torch.ones(3).double())
        True
    """
    flat, chosen, rest = split_params(model, params)

    def loss(p: ParamDict) -> Tensor:
        value = loss_fn(functional_call(model, {**rest, **p}, (inputs,)), targets)
        return require_scalar_loss(value, "hvp")

    if isinstance(v, Mapping):
        return hvp_dict(loss, chosen, {n: v[n] for n in flat.names}, mode=mode)
    if v.ndim == 1:
        return flat.flatten(hvp_dict(loss, chosen, flat.as_dict(v), mode=mode))
    if v.ndim != 2:
        raise ValueError(f"v must be (n,), (n, k) or a dict, got shape {tuple(v.shape)}")
    out = hvp_dict(loss, chosen, columns_to_dict(flat, v), batched=True, mode=mode)
    return dict_to_columns(flat, out)
