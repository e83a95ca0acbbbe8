r"""Hessian, generalized Gauss-Newton and empirical Fisher of a model's loss over a dataset.

With ``loss_fn`` mean-reduced over a batch and batches :math:`b` of :math:`n_b` examples,
:math:`N = \sum_b n_b`, :math:`f` the network and :math:`\ell` the loss on its outputs:

.. math::
    \begin{aligned}
        L(\theta) &= \textstyle\sum_b \frac{n_b}{N} L_b(\theta)
            \qquad\text{(the loss of the concatenated data)} \\
        H &= \textstyle\sum_b \frac{n_b}{N} \nabla^2_\theta L_b(\theta) \\
        G &= \textstyle\sum_b \frac{n_b}{N} J_b^\top \big(\nabla^2_{f} L_b\big) J_b,
            \qquad J_b = \partial f(X_b;\theta)/\partial\theta \\
        F &= \textstyle\frac{1}{N} \sum_{i=1}^{N} g_i g_i^\top,
            \qquad g_i = \nabla_\theta\, \ell(f(x_i;\theta), y_i)
    \end{aligned}

The operators are snapshots: parameters and buffers are copied when the operator is built,
and later changes to the model do not affect it. ``dtype=torch.float64`` evaluates a
float64 copy of the model (the user's model is never modified). Reference designs:
curvlinops ``_base.py`` (one operator type, weighting by example count, determinism check)
and PyHessian ``dataloader_hv_product`` (weighting by example count); no code was copied.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from gradkit.curvature._data import BatchSource, check_no_train_batchnorm
from gradkit.curvature._data import check_deterministic as _check_deterministic
from gradkit.curvature._operator import LinearOperator
from gradkit.curvature.hvp import (
    GradientGraph,
    LossFn,
    Mode,
    ParamDict,
    columns_to_dict,
    dict_to_columns,
    hvp_dict,
    split_params,
)


class CurvatureOperator(LinearOperator):
    """Shared machinery of :class:`HessianOperator`, :class:`GGNOperator` and
    :class:`EmpiricalFisherOperator` (see the module docstring for the definitions).

    Args:
        model: the network. Train-mode BatchNorm is refused; other train-mode randomness
            (Dropout) is caught by the determinism check.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, mean-reduced over the batch.
        data: one ``(inputs, targets)`` batch or an iterable of them (e.g. a ``DataLoader``
            with ``shuffle=False``); re-iterated on every product.
        params: names of the parameters (a layer, a block); default all trainable ones.
        dtype: evaluate the model in this dtype (on a copy when it differs).
        check_deterministic: iterate ``data`` twice and run the model twice on (the first 64
            examples of) the first batch at construction; raise
            :class:`NondeterministicError` naming the failed check (data order / data
            values / model output).
        chunk_size: columns per ``vmap``-ed block in ``op @ V`` (memory grows with it;
            ``None``: all at once); unused by the Hessian's default reverse-over-reverse
            products, which take the columns one at a time through a shared graph.
        mode: "auto", "fwd-rev" or "rev-rev". GGN and empirical Fisher: "auto" uses
            forward-mode products, falling back to reverse-over-reverse where an operation
            has no forward-mode rule. Hessian: "auto" = "rev-rev" (see
            :class:`HessianOperator`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        params: Iterable[str] | None = None,
        *,
        dtype: torch.dtype | None = None,
        check_deterministic: bool = True,
        chunk_size: int | None = 32,
        mode: Mode = "auto",
    ):
        check_no_train_batchnorm(model)
        if dtype is not None and any(p.dtype != dtype for p in model.parameters()):
            model = copy.deepcopy(model).to(dtype)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"Invalid chunk_size: {chunk_size}")
        if mode not in ("auto", "fwd-rev", "rev-rev"):
            raise ValueError(f"Invalid mode: {mode!r} (use 'auto', 'fwd-rev' or 'rev-rev')")
        flat, chosen, rest = split_params(model, params)
        super().__init__(flat.numel, flat.dtype, flat.device)
        self.model = model
        self.loss_fn = loss_fn
        self.flat = flat
        self.param_names = list(flat.names)
        self._params: ParamDict = {n: p.clone() for n, p in chosen.items()}
        self._rest: ParamDict = {n: t.clone() for n, t in rest.items()}
        self.chunk_size = chunk_size
        self.mode = mode
        self.source = BatchSource(data, self.dtype, self.device)
        self.num_examples = self.source.num_examples
        if check_deterministic:
            _check_deterministic(self.source, lambda x: self._forward(self._params, x),
                                 type(self).__name__)

    # -- model evaluation ------------------------------------------------------------
    def _forward(self, p: ParamDict, x: Tensor) -> Tensor:
        return functional_call(self.model, {**self._rest, **p}, (x,))

    def _batch_loss(self, x: Tensor, y: Tensor) -> Callable[[ParamDict], Tensor]:
        return lambda p: self.loss_fn(self._forward(p, x), y)

    def loss(self) -> Tensor:
        """The full-dataset loss (example-count weighted mean of the batch losses)."""
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for x, y in self.source:
                total += self._batch_loss(x, y)(self._params) * (x.shape[0] / self.num_examples)
        return total

    def gradient(self) -> Tensor:
        """The full-dataset gradient as a flat vector of length ``n`` (one gradient pass over
        the data; free for a cached :class:`HessianOperator`, whose graph holds it)."""
        total = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        for x, y in self.source:
            g = grad(self._batch_loss(x, y))(self._params)
            total += self.flat.flatten(g) * (x.shape[0] / self.num_examples)
        return total

    # -- products ----------------------------------------------------------------------
    def _try_modes(self, fwd: Callable[[], Any], rev: Callable[[], Any]) -> Any:
        """Run ``fwd`` unless forward mode failed before; fall back to ``rev`` in "auto"."""
        if self.mode != "rev-rev":
            try:
                return fwd()
            except (NotImplementedError, RuntimeError):
                if self.mode == "fwd-rev":
                    raise
                self.mode = "rev-rev"
        return rev()

    def _batch_product(self, x: Tensor, y: Tensor, T: ParamDict) -> ParamDict:
        """``(sum over the batch of the per-example curvature) @ t`` for a block of tangents
        ``T = {name: (k, *shape)}``, divided by ``_batch_divisor``."""
        raise NotImplementedError

    def _matmat(self, V: Tensor) -> Tensor:
        out = torch.zeros_like(V)
        step = V.shape[1] if self.chunk_size is None else self.chunk_size
        for x, y in self.source:
            weight = x.shape[0] / self.num_examples
            for start in range(0, V.shape[1], step):
                cols = slice(start, start + step)
                T = columns_to_dict(self.flat, V[:, cols])
                out[:, cols] += dict_to_columns(self.flat, self._batch_product(x, y, T)) * weight
        return out



class HessianOperator(CurvatureOperator):
    """The Hessian :math:`H` of the full-dataset loss (see the module docstring).

    Products are reverse-over-reverse through a kept gradient graph
    (:class:`~gradkit.curvature.hvp.GradientGraph`: forward and ``create_graph`` backward
    once, then one double backward per column), chosen by ``cache``:

    - ``cache=False`` (default for a loader): per batch, the batch's graph is built, used for
      all columns of ``V`` and freed; memory is one batch's gradient graph.
    - ``cache=True`` (default for a single batch): the gradient graph of the whole dataset is
      built once and kept across products (like PyHessian's single-batch mode); memory is
      that graph for all the data. :meth:`gradient` is then free (read from the graph).

    ``mode="fwd-rev"`` (uncached only) instead uses forward-over-reverse ``jvp(grad(L_b))``
    ``vmap``-ed over ``chunk_size`` columns; reverse-over-reverse is the default because
    ``benchmarks/hessian.py`` measured it cheaper on CPU (see :mod:`gradkit.curvature.hvp`).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Any,
                 params: Iterable[str] | None = None, *, cache: bool | None = None,
                 **kwargs: Any):
        super().__init__(model, loss_fn, data, params, **kwargs)
        self.cache = self.source.single if cache is None else bool(cache)
        self._graph: GradientGraph | None = None

    def _full_graph(self) -> GradientGraph:
        if self._graph is None:
            def total(p: ParamDict) -> Tensor:
                return sum(self._batch_loss(x, y)(p) * (x.shape[0] / self.num_examples)
                           for x, y in self.source)

            self._graph = GradientGraph(total, self._params)
        return self._graph

    def gradient(self) -> Tensor:
        if not self.cache:
            return super().gradient()
        return self.flat.flatten(self._full_graph().gradient)

    def _batch_product(self, x: Tensor, y: Tensor, T: ParamDict) -> ParamDict:
        return hvp_dict(self._batch_loss(x, y), self._params, T, batched=True,
                        mode="fwd-rev")[0]

    def _matmat(self, V: Tensor) -> Tensor:
        if not self.cache and self.mode == "fwd-rev":
            return super()._matmat(V)
        graphs: Iterable[tuple[GradientGraph, float]] = (
            [(self._full_graph(), 1.0)] if self.cache else
            ((GradientGraph(self._batch_loss(x, y), self._params), x.shape[0] / self.num_examples)
             for x, y in self.source))
        out = torch.zeros_like(V)
        k = V.shape[1]
        for graph, weight in graphs:
            for j in range(k):
                prod = graph.product(self.flat.as_dict(V[:, j]), retain=self.cache or j < k - 1)
                out[:, j] += self.flat.flatten(prod) * weight
        return out


class GGNOperator(CurvatureOperator):
    """The generalized Gauss-Newton :math:`G = J^\\top (\\nabla_f^2 \\ell) J` (module docstring).

    For a model linear in its parameters :math:`G = H`. Products: ``J t`` by ``jvp`` of the
    network (double-``vjp`` fallback), the output Hessian by ``jvp`` of the loss gradient
    with respect to the outputs, and ``J^T`` by ``vjp``; ``vmap``-ed over the columns.
    """

    def _batch_product(self, x: Tensor, y: Tensor, T: ParamDict) -> ParamDict:
        def f(p: ParamDict) -> Tensor:
            return self._forward(p, x)

        out, pullback = vjp(f, self._params)
        out_grad = grad(lambda o: self.loss_fn(o, y))

        def fwd_one(t: ParamDict) -> ParamDict:
            jt = jvp(f, (self._params,), (t,))[1]
            return pullback(jvp(out_grad, (out,), (jt,))[1])[0]

        def rev_one(t: ParamDict) -> ParamDict:
            jt = vjp(pullback, torch.ones_like(out))[1]((t,))[0]  # linear in u
            return pullback(vjp(out_grad, out)[1](jt)[0])[0]

        return self._try_modes(lambda: vmap(fwd_one)(T), lambda: vmap(rev_one)(T))


class EmpiricalFisherOperator(CurvatureOperator):
    """The empirical Fisher :math:`F = \\frac1N \\sum_i g_i g_i^\\top` (module docstring).

    ``g_i`` is the gradient of example ``i``'s own loss ``loss_fn(f(x_i)[None], y_i[None])``
    (a batch of one), so no per-example gradients are stored: ``F t`` is one ``jvp`` of the
    per-example losses (the ``N`` numbers ``g_i^T t``) followed by one ``vjp``.
    """

    def _batch_product(self, x: Tensor, y: Tensor, T: ParamDict) -> ParamDict:
        def losses(p: ParamDict) -> Tensor:
            out = self._forward(p, x)
            return vmap(lambda o, t: self.loss_fn(o[None], t[None]))(out, y)

        per_example, pullback = vjp(losses, self._params)
        n_b = x.shape[0]

        def fwd_one(t: ParamDict) -> ParamDict:
            return pullback(jvp(losses, (self._params,), (t,))[1] / n_b)[0]

        def rev_one(t: ParamDict) -> ParamDict:
            gt = vjp(pullback, torch.ones_like(per_example))[1]((t,))[0]
            return pullback(gt / n_b)[0]

        return self._try_modes(lambda: vmap(fwd_one)(T), lambda: vmap(rev_one)(T))
