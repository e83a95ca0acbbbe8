r"""Hessian, generalized Gauss-Newton and empirical Fisher of a model's loss over a dataset.

With batches :math:`b` of :math:`n_b` examples, :math:`N = \sum_b n_b`, :math:`f` the
network, :math:`\ell` the loss of one example and :math:`L_b` the loss of batch :math:`b` as
``loss_fn`` reduces it, the operators are the curvature of the loss of the concatenated data:

.. math::
    \begin{aligned}
        L(\theta) &= \textstyle\sum_b w_b\, L_b(\theta), \qquad
            w_b = \begin{cases} n_b / N & \text{reduction "mean"} \\
                                1 & \text{reduction "sum"} \end{cases} \\
        H &= \textstyle\sum_b w_b\, \nabla^2_\theta L_b(\theta) \\
        G &= \textstyle\sum_b w_b\, J_b^\top \big(\nabla^2_{f} L_b\big) J_b,
            \qquad J_b = \partial f(X_b;\theta)/\partial\theta \\
        F &= \textstyle c \sum_{i=1}^{N} g_i g_i^\top,
            \qquad g_i = \nabla_\theta\, \ell(f(x_i;\theta), y_i), \quad
            c = 1/N \text{ ("mean") or } 1 \text{ ("sum")}
    \end{aligned}

So a loader with batches of 32, 32 and 5 gives exactly the curvature of the 69 examples in
one batch, for either reduction. A sum-reduced loss gives ``N`` times the curvature of the
mean-reduced one, as in curvlinops (``HessianLinearOperator`` docstring). The reduction is
read from the loss (``nn.CrossEntropyLoss(reduction="sum")``, or
``functools.partial(F.cross_entropy, reduction="sum")``) or given as ``reduction=``. For a
plain function (``F.cross_entropy``, a lambda) with more than one batch, the operator checks
at construction that the loss of the first batch is the example-weighted mean of the losses
of its two halves; a loss that is a sum instead is refused with a message asking for
``reduction="sum"`` (otherwise the result would depend on the batching). A
``reduction="none"`` loss (not a scalar) is refused.

The operators are snapshots: parameters and buffers are copied when the operator is built,
and later changes to the model do not affect it. ``dtype=torch.float64`` evaluates a
float64 copy of the model (the user's model is never modified). Reference designs:
curvlinops ``_torch_base.py`` (one operator type, weighting by example count, determinism
check) and PyHessian ``dataloader_hv_product`` (weighting by example count); no code was
copied.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from gradkit.curvature._data import (
    BatchSource,
    check_loss,
    check_no_train_batchnorm,
    resolve_reduction,
)
from gradkit.curvature._data import check_deterministic as _check_deterministic
from gradkit.curvature._operator import LinearOperator
from gradkit.curvature.hvp import (
    GradientGraph,
    LossFn,
    Mode,
    ParamDict,
    columns_to_dict,
    dict_to_columns,
    fwd_rev_products,
    split_params,
)

Reduction = Literal["mean", "sum"]
BlockProduct = Callable[[ParamDict], ParamDict]  # {name: (k, *shape)} -> same layout


class CurvatureOperator(LinearOperator):
    """Shared machinery of :class:`HessianOperator`, :class:`GGNOperator` and
    :class:`EmpiricalFisherOperator` (see the module docstring for the definitions).

    A subclass implements ``_batch_product(x, y, T)``: the curvature of one batch's loss
    (as ``loss_fn`` reduces it) applied to a block of tangents ``T = {name: (k, *shape)}``.
    :meth:`_matmat` weights the batches and splits the columns into ``chunk_size`` blocks.

    Args:
        model: the network. Train-mode BatchNorm is refused; other train-mode randomness
            (Dropout) is caught by the determinism check.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, mean- or sum-reduced over the
            batch (module docstring).
        data: one ``(inputs, targets)`` batch or a re-iterable collection of them (a list, a
            ``DataLoader`` with ``shuffle=False``); iterated once per product. A one-shot
            iterator (a generator) is refused.
        params: names of the parameters (a layer, a block); default all trainable ones.
        dtype: evaluate the model in this dtype (on a copy when it differs).
        reduction: "mean" or "sum": how ``loss_fn`` reduces a batch. Default: read from
            ``loss_fn`` (module docstring).
        check_deterministic: iterate ``data`` twice and run the model twice on (the first 64
            examples of) the first batch at construction; raise
            :class:`~gradkit.curvature.NondeterministicError` naming the failed check (data
            order / data values / model output).
        chunk_size: columns per block in ``op @ V`` (memory grows with it; ``None``: all at
            once).
        mode: "auto", "fwd-rev" or "rev-rev". "auto" uses forward-mode products (Hessian:
            for blocks on more than one thread, see :class:`HessianOperator`); if they fail
            (an operation without a forward-mode rule) and reverse-over-reverse succeeds,
            this operator uses reverse-over-reverse from then on (``mode`` keeps the value
            given).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        params: Iterable[str] | None = None,
        *,
        dtype: torch.dtype | None = None,
        reduction: Reduction | None = None,
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
        self._forward_failed = False  # "auto": forward mode failed once, use rev-rev
        self.source = BatchSource(data, self.dtype, self.device)
        self.num_examples = self.source.num_examples
        owner = type(self).__name__
        self.reduction: Reduction = resolve_reduction(loss_fn, reduction, owner)
        inferred = check_loss(self.source, lambda x: self._forward(self._params, x), loss_fn,
                              owner, infer_reduction=reduction is None)
        if inferred == "sum" and self.reduction != "sum":
            raise ValueError(
                f"{owner}: loss_fn sums over the examples of a batch (its value on the first "
                "batch is the sum, not the mean, of its values on the two halves), so the "
                "example-count weighting of mean-reduced batches would make the result depend "
                "on the batching. Pass reduction='sum' to get the curvature of the summed loss "
                "over all data (N times that of the mean), or use a mean-reduced loss."
            )
        if check_deterministic:
            _check_deterministic(self.source, lambda x: self._forward(self._params, x), owner)

    # -- model evaluation ------------------------------------------------------------
    def _forward(self, p: ParamDict, x: Tensor) -> Tensor:
        return functional_call(self.model, {**self._rest, **p}, (x,))

    def _batch_loss(self, x: Tensor, y: Tensor) -> Callable[[ParamDict], Tensor]:
        return lambda p: self.loss_fn(self._forward(p, x), y)

    def _weight(self, n_b: int) -> float:
        """``w_b`` of the module docstring."""
        return 1.0 if self.reduction == "sum" else n_b / self.num_examples

    def _total_loss(self, p: ParamDict) -> Tensor:
        return sum(self._batch_loss(x, y)(p) * self._weight(x.shape[0])
                   for x, y in self.source)

    def loss(self) -> Tensor:
        """The full-dataset loss ``L`` (module docstring)."""
        with torch.no_grad():
            return self._total_loss(self._params)

    def gradient(self) -> Tensor:
        """The full-dataset gradient as a flat vector of length ``n`` (one gradient pass over
        the data; free for a cached :class:`HessianOperator`, whose graph holds it)."""
        total = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        for x, y in self.source:
            g = grad(self._batch_loss(x, y))(self._params)
            total += self.flat.flatten(g) * self._weight(x.shape[0])
        return total

    # -- products ----------------------------------------------------------------------
    def _batch_product(self, x: Tensor, y: Tensor, T: ParamDict) -> ParamDict:
        """The curvature of batch ``(x, y)``'s loss applied to ``T = {name: (k, *shape)}``."""
        raise NotImplementedError

    def _block_products(self, k: int) -> Iterator[tuple[float, BlockProduct]]:
        """``(w_b, T -> C_b T)`` for each batch ``b``, ``C_b`` the batch's curvature, for a
        product with ``k`` columns."""
        for x, y in self.source:
            yield self._weight(x.shape[0]), partial(self._batch_product, x, y)

    def _matmat(self, V: Tensor) -> Tensor:
        out = torch.zeros_like(V)
        step = V.shape[1] if self.chunk_size is None else self.chunk_size
        for weight, product in self._block_products(V.shape[1]):
            for start in range(0, V.shape[1], step):
                cols = slice(start, start + step)
                T = columns_to_dict(self.flat, V[:, cols])
                out[:, cols] += dict_to_columns(self.flat, product(T)) * weight
        return out

    def _fwd_or_rev(self, fwd: Callable[[], ParamDict], rev: Callable[[], ParamDict]
                    ) -> ParamDict:
        """``fwd()`` in mode "fwd-rev", ``rev()`` in "rev-rev"; in "auto" ``fwd()``, and
        ``rev()`` where it fails (from then on only ``rev()``). If ``rev()`` fails too, its
        error is raised: a genuine error is never hidden by the fallback."""
        if self.mode == "rev-rev" or (self.mode == "auto" and self._forward_failed):
            return rev()
        if self.mode == "fwd-rev":
            return fwd()
        try:
            return fwd()
        except (NotImplementedError, RuntimeError):
            out = rev()
            self._forward_failed = True
            return out


class HessianOperator(CurvatureOperator):
    """The Hessian :math:`H` of the full-dataset loss (see the module docstring).

    Single vectors, and blocks when torch runs on one thread, are multiplied
    reverse-over-reverse through a kept gradient graph
    (:class:`~gradkit.curvature.hvp.GradientGraph`: forward and ``create_graph`` backward
    once, then one double backward per column), chosen by ``cache``:

    - ``cache=False`` (default for a loader): per batch, the batch's graph is built, used for
      all columns of ``V`` and freed; memory is one batch's gradient graph.
    - ``cache=True`` (default for a single batch): the gradient graph of the whole dataset is
      built once and kept across products (like PyHessian's single-batch mode); memory is
      that graph for all the data. :meth:`gradient` is then free (read from the graph).

    Blocks of columns with more than one thread (``torch.get_num_threads() > 1``) are
    multiplied forward-over-reverse, ``jvp(grad(L_b))`` ``vmap``-ed over ``chunk_size``
    columns: one batched pass whose large matrix products use the threads well, where the
    per-column double backward pays one small pass per column. On the digits MLP of
    ``benchmarks/hessian.py`` (112,810 parameters, 1,797 examples; ``--threads 2 --sections
    block``), a 16-column block cost 4.3 single products batched against 16.3 column by
    column, and Hutch++ with 48 products went from 2.4x to 0.8x the time of curvlinops'; on
    one thread the batched pass cost about 24 single products against 16 (CPU time, same
    model), hence the switch. Where forward mode fails (an
    operation without a forward-mode rule) the operator falls back to the double backward.
    ``mode="rev-rev"`` or ``"fwd-rev"`` fixes the method for every product.

    Args:
        model, loss_fn, data, params: as for :class:`CurvatureOperator`.
        cache: keep the whole dataset's gradient graph (above); default: ``True`` for a
            single ``(inputs, targets)`` batch, ``False`` for a collection of batches.
        **kwargs: ``dtype``, ``reduction``, ``check_deterministic``, ``chunk_size``,
            ``mode`` of :class:`CurvatureOperator`.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from gradkit.curvature import HessianOperator
        >>> X, Y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> model = nn.Linear(3, 1, bias=False).double()
        >>> H = HessianOperator(model, nn.functional.mse_loss, [(X[:5], Y[:5]), (X[5:], Y[5:])])
        >>> torch.allclose(H.to_dense(), 2 / 8 * X.T @ X)  # mean squared error: (2/N) X^T X
        True
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Any,
                 params: Iterable[str] | None = None, *, cache: bool | None = None,
                 **kwargs: Any):
        super().__init__(model, loss_fn, data, params, **kwargs)
        self.cache = self.source.single if cache is None else bool(cache)
        self._graph: GradientGraph | None = None

    def _full_graph(self) -> GradientGraph:
        if self._graph is None:
            self._graph = GradientGraph(self._total_loss, self._params)
        return self._graph

    def gradient(self) -> Tensor:
        if not self.cache:
            return super().gradient()
        return self.flat.flatten(self._full_graph().gradient)

    def _batch_product(self, x: Tensor, y: Tensor, T: ParamDict) -> ParamDict:
        """Forward-over-reverse on one batch; the double backward where it fails."""
        loss = self._batch_loss(x, y)
        return self._fwd_or_rev(
            lambda: fwd_rev_products(loss, self._params, T),
            lambda: GradientGraph(loss, self._params).products(T, retain=False))

    def _block_products(self, k: int) -> Iterator[tuple[float, BlockProduct]]:
        batched = self.mode == "fwd-rev" or (
            self.mode == "auto" and k > 1 and torch.get_num_threads() > 1
            and not self._forward_failed)
        if batched:
            yield from super()._block_products(k)
        elif self.cache:
            yield 1.0, self._full_graph().products
        else:  # one graph per batch, shared by all column blocks, freed afterwards
            for x, y in self.source:
                yield (self._weight(x.shape[0]),
                       GradientGraph(self._batch_loss(x, y), self._params).products)


class GGNOperator(CurvatureOperator):
    """The generalized Gauss-Newton :math:`G = J^\\top (\\nabla_f^2 \\ell) J` (module docstring).

    For a model linear in its parameters :math:`G = H`. Products: ``J t`` by ``jvp`` of the
    network (double-``vjp`` in mode "rev-rev"), the output Hessian by ``jvp`` of the loss
    gradient with respect to the outputs, and ``J^T`` by ``vjp``; ``vmap``-ed over the
    columns.

    Args:
        model, loss_fn, data, params: as for :class:`CurvatureOperator`.
        **kwargs: ``dtype``, ``reduction``, ``check_deterministic``, ``chunk_size``,
            ``mode`` of :class:`CurvatureOperator`.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from gradkit.curvature import GGNOperator, HessianOperator
        >>> X, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
        >>> model = nn.Linear(4, 3).double()  # linear in its parameters: G = H
        >>> G = GGNOperator(model, nn.functional.cross_entropy, (X, y))
        >>> H = HessianOperator(model, nn.functional.cross_entropy, (X, y))
        >>> torch.allclose(G.to_dense(), H.to_dense())
        True
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

        return self._fwd_or_rev(lambda: vmap(fwd_one)(T), lambda: vmap(rev_one)(T))


class EmpiricalFisherOperator(CurvatureOperator):
    """The empirical Fisher :math:`F = c \\sum_i g_i g_i^\\top` (module docstring).

    ``g_i`` is the gradient of example ``i``'s own loss ``loss_fn(f(x_i)[None], y_i[None])``
    (a batch of one), so no per-example gradients are stored: ``F t`` is one ``jvp`` of the
    per-example losses (the ``N`` numbers ``g_i^T t``) followed by one ``vjp``.

    Args:
        model, loss_fn, data, params, **kwargs: as for :class:`GGNOperator`.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from gradkit.curvature import EmpiricalFisherOperator
        >>> X, y = torch.randn(6, 2, dtype=torch.float64), torch.randint(0, 2, (6,))
        >>> model = nn.Linear(2, 2).double()
        >>> F = EmpiricalFisherOperator(model, nn.functional.cross_entropy, (X, y))
        >>> F.shape, bool(torch.linalg.eigvalsh(F.to_dense()).min() > -1e-12)  # PSD
        ((6, 6), True)
    """

    def _batch_product(self, x: Tensor, y: Tensor, T: ParamDict) -> ParamDict:
        def losses(p: ParamDict) -> Tensor:
            out = self._forward(p, x)
            return vmap(lambda o, t: self.loss_fn(o[None], t[None]))(out, y)

        per_example, pullback = vjp(losses, self._params)
        # the batch's own empirical Fisher: the mean (or sum) of g_i g_i^T over the batch
        scale = 1.0 if self.reduction == "sum" else 1.0 / x.shape[0]

        def fwd_one(t: ParamDict) -> ParamDict:
            return pullback(jvp(losses, (self._params,), (t,))[1] * scale)[0]

        def rev_one(t: ParamDict) -> ParamDict:
            gt = vjp(pullback, torch.ones_like(per_example))[1]((t,))[0]
            return pullback(gt * scale)[0]

        return self._fwd_or_rev(lambda: vmap(fwd_one)(T), lambda: vmap(rev_one)(T))
