"""The built-in instruments: each wraps one function of :mod:`gradkit.instruments` with a
schedule, and :func:`default_instruments` is the default set used by the Monitor."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from . import basic, gradients, stability
from .collapse import neural_collapse
from .core import Instrument, StepContext, split_batch
from .opposing import opposing_signals


class Loss(Instrument):
    """``loss``: the value passed to ``monitor.step(loss=...)``, else the batch loss.

    Args:
        every: period in steps.
        start: first step at which it runs.
        dense_until: also record every step before this one.
    """

    name = "loss"
    touches_model = False

    def __init__(self, every: int = 1, start: int = 0, *, dense_until: int = 0):
        super().__init__(every, start)
        if not isinstance(dense_until, int) or dense_until < 0:
            raise ValueError(f"Invalid dense_until: {dense_until}")
        self.dense_until = dense_until

    def measure(self, ctx: StepContext) -> dict[str, Any]:
        if ctx.loss is not None:
            loss = ctx.loss.detach() if isinstance(ctx.loss, Tensor) else ctx.loss
            return {"loss": float(loss)}
        with torch.no_grad():
            return {"loss": float(ctx.loss_fn(ctx.outputs(), ctx.targets))}


class GradNorm(Instrument):
    """``grad_norm``: global L2 norm of the gradient
    (:func:`gradkit.instruments.basic.global_norm_tensor`, shared with
    :class:`gradkit.schedules.GradNormRecorder`).

    Args:
        every: period in steps.
        start: first step at which it runs.
    """

    name = "grad_norm"
    touches_model = False

    def measure(self, ctx: StepContext) -> dict[str, Any]:
        return {"grad_norm": basic.global_norm(ctx.grads())}


class LayerGradNorms(Instrument):
    """``grad_norm/<param>``: per-parameter-tensor gradient norms.

    Args:
        every: period in steps.
        start: first step at which it runs.
    """

    name = "layer_grad_norms"
    touches_model = False

    def measure(self, ctx: StepContext) -> dict[str, Any]:
        return {f"grad_norm/{n}": v for n, v in basic.layer_norms(ctx.grads()).items()}


class UpdateSize(Instrument):
    """``update_size`` ‖Δθ‖, ``update_ratio`` ‖Δθ‖/‖θ‖ and ``update_ratio/<param>`` of the
    optimizer step taken between ``measure`` and ``measure_after``.

    Args:
        every: period in steps.
        start: first step at which it runs.
    """

    name = "update"
    touches_model = False
    two_phase = True

    def __init__(self, every: int = 1, start: int = 0):
        super().__init__(every, start)
        self._before: dict[str, Tensor] | None = None  # the parameters seen by measure

    def measure(self, ctx: StepContext) -> dict[str, Any]:
        self._before = {n: p.detach().clone() for n, p in ctx.params().items()}
        return {}

    def measure_after(self, ctx: StepContext) -> dict[str, Any]:
        before, self._before = self._before, None
        if before is None:
            return {}
        names = list(before)
        params = ctx.params()
        # the values of basic.update_size / update_ratio / layer_update_ratios, computed with
        # one subtraction and two norm passes, read back with a single synchronisation
        diffs = torch._foreach_sub([params[n].detach() for n in names],
                                   [before[n] for n in names])
        num = torch.stack(torch._foreach_norm(diffs))
        den = torch.stack(torch._foreach_norm([before[n] for n in names]))
        # combined in float64, as basic.global_norm_tensor does
        size = torch.linalg.vector_norm(num.double())
        weight = torch.linalg.vector_norm(den.double())
        size_f, weight_f, *layers = torch.cat([size[None], weight[None], num / den]).tolist()
        out = {"update_size": size_f,
               "update_ratio": size_f / weight_f if weight_f > 0 else float("inf")}
        out.update({f"update_ratio/{n}": v for n, v in zip(names, layers)})
        return out


class NLMAlignment(Instrument):
    """``nlm_alignment``: cos(−g, θ), the gradient's alignment with the naive loss
    minimization direction (see :func:`gradkit.instruments.nlm_alignment`).

    Args:
        every: period in steps.
        start: first step at which it runs.
    """

    name = "nlm_alignment"
    touches_model = False

    def measure(self, ctx: StepContext) -> dict[str, Any]:
        return {"nlm_alignment": basic.nlm_alignment(ctx.grads(), ctx.params())}


class LogitStats(Instrument):
    """``max_abs_logit``, ``logit_growth`` (change of max|z| per step since the previous
    measurement), ``softmax_collapse`` and ``zero_loss_fraction`` on the batch outputs.

    Args:
        every: period in steps.
        start: first step at which it runs.
    """

    name = "logits"
    touches_model = False

    def __init__(self, every: int = 1, start: int = 0):
        super().__init__(every, start)
        self._last: tuple[int, float] | None = None

    def measure(self, ctx: StepContext) -> dict[str, Any]:
        z = ctx.outputs()
        m = basic.max_abs_logit(z)
        out = {"max_abs_logit": m, "softmax_collapse": basic.softmax_collapse_fraction(z),
               "zero_loss_fraction": basic.zero_loss_fraction(ctx.per_example_losses())}
        if self._last is not None and ctx.step > self._last[0]:
            out["logit_growth"] = (m - self._last[1]) / (ctx.step - self._last[0])
        self._last = (ctx.step, m)
        return out


class Coherence(Instrument):
    """``coherence_alpha`` α and ``m_coherence`` m·α from the per-example gradient moments.

    Args:
        every: period in steps.
        start: first step at which it runs.
    """

    name = "coherence"
    touches_model = False

    def measure(self, ctx: StepContext) -> dict[str, Any]:
        c = gradients.coherence(ctx.per_example_moments())
        return {"coherence_alpha": c.alpha, "m_coherence": c.m_coherence}


class NoiseScale(Instrument):
    """Gradient noise scale ``B_simple``: ``noise_scale`` (ratio of the separately smoothed
    |G|² and tr Σ), ``noise_scale_raw`` (this step's ratio), ``noise_grad_sq`` and
    ``noise_trace_cov`` (smoothed).

    ``method="per_example"`` uses the per-example estimator on the shared moments;
    ``"two_batch"`` splits the batch into ``n_chunks`` small batches (B_small =
    B/n_chunks, one ``autograd.grad`` each, no per-example gradients) whose average is the
    big batch, with ‖G_small‖² averaged over the chunks (gpt-neox's scheme).

    Args:
        every: period in steps.
        start: first step at which it runs.
        method: ``"per_example"`` or ``"two_batch"``.
        n_chunks: small batches of the two-batch estimator (at least 2).
        beta: EMA factor of :class:`~gradkit.instruments.NoiseScaleEMA`.
    """

    name = "noise_scale"

    def __init__(self, every: int = 1, start: int = 0, *,
                 method: Literal["per_example", "two_batch"] = "per_example",
                 n_chunks: int = 4, beta: float = 0.99):
        super().__init__(every, start)
        if method not in ("per_example", "two_batch"):
            raise ValueError(f"Invalid method: {method!r} (use 'per_example' or 'two_batch')")
        if n_chunks < 2:
            raise ValueError(f"Invalid n_chunks: {n_chunks} (need at least 2)")
        self.method, self.n_chunks = method, n_chunks
        self.touches_model = method == "two_batch"
        self.ema = gradients.NoiseScaleEMA(beta)

    def _two_batch(self, ctx: StepContext) -> gradients.NoiseScale:
        params = list(ctx.params().values())
        xs = torch.tensor_split(ctx.inputs, self.n_chunks)
        ys = torch.tensor_split(ctx.targets, self.n_chunks)
        sizes = [x.shape[0] for x in xs]
        if min(sizes) < 1 or len(set(sizes)) != 1:
            raise ValueError(f"the two-batch noise scale needs a batch divisible into "
                             f"{self.n_chunks} equal non-empty chunks, got {ctx.inputs.shape[0]}")
        chunk_grads = []
        with torch.enable_grad():
            for x, y in zip(xs, ys):
                gs = torch.autograd.grad(ctx.loss_fn(ctx.model(x), y), params,
                                         allow_unused=True)
                chunk_grads.append(torch.cat([
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(gs, params)]))
        small = torch.stack(chunk_grads)
        small_sq = float((small * small).sum(1).mean())
        big = small.mean(0)
        return gradients.noise_scale_two_batch(small_sq, float(big @ big), sizes[0],
                                               ctx.inputs.shape[0])

    def measure(self, ctx: StepContext) -> dict[str, Any]:
        raw = (gradients.noise_scale_per_example(ctx.per_example_moments())
               if self.method == "per_example" else self._two_batch(ctx))
        smooth = self.ema.update(raw)
        return {"noise_scale": smooth.b_simple, "noise_scale_raw": raw.b_simple,
                "noise_grad_sq": smooth.grad_sq, "noise_trace_cov": smooth.trace_cov}


class GradientSNR(Instrument):
    """``grad_snr``: mean per-parameter gradient signal-to-noise ratio (GSNR).

    Args:
        every: period in steps.
        start: first step at which it runs.
    """

    name = "grad_snr"
    touches_model = False

    def measure(self, ctx: StepContext) -> dict[str, Any]:
        return {"grad_snr": gradients.gradient_snr(ctx.per_example_moments())}


class GradientTests(Instrument):
    """Cockpit-style NormTest / InnerTest / OrthoTest values: ``norm_test``, ``inner_test``,
    ``ortho_test``, the smallest η, θ, ν for which AdAdaGrad's norm, inner-product and
    orthogonality batch-size tests pass at the current batch size (computed by
    :func:`gradkit.batching.gradient_statistics` from the moments the other per-example
    instruments read, not re-implemented here).

    Args:
        every: period in steps.
        start: first step at which it runs.
    """

    name = "gradient_tests"
    touches_model = False

    def measure(self, ctx: StepContext) -> dict[str, Any]:
        from gradkit.batching import gradient_statistics

        stats = gradient_statistics(ctx.per_example_moments())
        return {"norm_test": stats.norm_test_value(),
                "inner_test": stats.inner_product_test_value(),
                "ortho_test": stats.orthogonality_test_value()}


def _threshold(ctx: StepContext) -> stability.Threshold | None:
    """The optimizer's stability threshold, or None (no optimizer, an optimizer without a
    known threshold, or param groups with different learning rates: nothing to draw)."""
    if ctx.optimizer is None:
        return None
    try:
        return stability.stability_threshold(ctx.optimizer)
    except ValueError:
        return None


def _data(ctx: StepContext, data: Any) -> Any:
    return (ctx.inputs, ctx.targets) if data is None else data


class Sharpness(Instrument):
    """``sharpness`` λ_max(∇²L) (Lanczos, warm-started from the previous top eigenvector) and
    ``sharpness_threshold`` of the optimizer (2/η for GD, (2+2β)/η heavy ball; see
    :mod:`.stability`) plus ``threshold_kind``. For Adam the raw sharpness has no
    closed-form threshold: use :class:`PreconditionedSharpness`.

    Args:
        every: period in steps.
        start: first step at which it runs.
        data: a fixed probe set (a batch or iterable of batches, e.g. the full training
            set for edge-of-stability plots); default the current mini-batch.
        k: number of top eigenvalues (``top_eigenvalues`` is recorded when ``k > 1``).
        tol: relative eigenvalue tolerance of Lanczos.
        warm_start: start Lanczos from the previous top eigenvector.
    """

    name = "sharpness"

    def __init__(self, every: int = 100, start: int = 0, *, data: Any = None, k: int = 1,
                 tol: float = 1e-3, warm_start: bool = True):
        super().__init__(every, start)
        self.data, self.k, self.tol, self.warm_start = data, k, tol, warm_start
        self._v0: Tensor | None = None

    def measure(self, ctx: StepContext) -> dict[str, Any]:
        vals, vecs = stability.sharpness(ctx.model, ctx.loss_fn, _data(ctx, self.data),
                                         k=self.k, generator=ctx.generator(), tol=self.tol,
                                         v0=self._v0, return_vectors=True)
        if self.warm_start:
            self._v0 = vecs[:, 0].detach().clone()
        out: dict[str, Any] = {"sharpness": float(vals[0])}
        if self.k > 1:
            out["top_eigenvalues"] = [float(v) for v in vals]
        thr = _threshold(ctx)
        if thr is not None and thr.kind != "adam":
            out.update(sharpness_threshold=thr.value, threshold_kind=thr.kind)
        return out


class PreconditionedSharpness(Instrument):
    """``precond_sharpness`` λ_max(P^-1/2 H P^-1/2) with Adam's P = diag(√v̂ + ε) and
    ``precond_threshold`` (2+2β₁)/((1−β₁)η). Skipped until Adam has state.

    Args:
        every: period in steps.
        start: first step at which it runs.
        data: a fixed probe set (default: the current mini-batch).
    """

    name = "precond_sharpness"

    def __init__(self, every: int = 100, start: int = 0, *, data: Any = None):
        super().__init__(every, start)
        self.data = data

    def measure(self, ctx: StepContext) -> dict[str, Any]:
        opt = ctx.optimizer
        if opt is None or not any(opt.state.get(p) for p in ctx.params().values()):
            return {}
        vals = stability.preconditioned_sharpness(ctx.model, ctx.loss_fn, _data(ctx, self.data),
                                                  opt, generator=ctx.generator())
        thr = stability.stability_threshold(opt)
        return {"precond_sharpness": float(vals[0]), "precond_threshold": thr.value}


class HessianTrace(Instrument):
    """``hessian_trace`` (Hutchinson), its ``hessian_trace_stderr`` and, for torch SGD,
    ``trace_threshold`` = 2/η (Wu, Wang & Su's bound for SGD-stable minima).

    Args:
        every: period in steps.
        start: first step at which it runs.
        data: a fixed probe set (default: the current mini-batch).
        n_probes: number of Rademacher probes.
    """

    name = "hessian_trace"

    def __init__(self, every: int = 100, start: int = 0, *, data: Any = None,
                 n_probes: int = 10):
        super().__init__(every, start)
        self.data, self.n_probes = data, n_probes

    def measure(self, ctx: StepContext) -> dict[str, Any]:
        est = stability.hessian_trace(ctx.model, ctx.loss_fn, _data(ctx, self.data),
                                      n_probes=self.n_probes, generator=ctx.generator())
        out: dict[str, Any] = {"hessian_trace": est.estimate, "hessian_trace_stderr": est.stderr}
        thr = _threshold(ctx)
        if thr is not None and thr.kind != "adam":  # the 2/η trace bound is an SGD result
            out["trace_threshold"] = stability.gd_threshold(thr.lr)
        return out


class NeuralCollapse(Instrument):
    """NC1–NC4 (``nc1``, ``nc2_*``, ``nc3``, ``nc4``) of the features entering the
    ``nn.Linear`` named ``classifier`` (captured by a forward pre-hook), with that layer's
    weight and bias.

    Args:
        classifier: the name of the final ``nn.Linear`` in ``model.named_modules()``.
        every: period in steps.
        start: first step at which it runs.
        data: a probe set ``(inputs, labels)`` (default: the batch).
    """

    name = "neural_collapse"

    def __init__(self, classifier: str, every: int = 100, start: int = 0, *, data: Any = None):
        super().__init__(every, start)
        self.classifier, self.data = classifier, data

    def measure(self, ctx: StepContext) -> dict[str, Any]:
        modules = dict(ctx.model.named_modules())
        layer = modules.get(self.classifier)
        if not isinstance(layer, torch.nn.Linear):
            raise ValueError(f"NeuralCollapse(classifier={self.classifier!r}) must name an "
                             f"nn.Linear of the model; its modules: {list(modules)[1:]}")
        x, y, _ = split_batch(_data(ctx, self.data))
        captured: list[Tensor] = []
        handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            with torch.no_grad():
                ctx.model(x)
        finally:
            handle.remove()
        nc = neural_collapse(captured[-1], y, layer.weight, layer.bias)
        return {k: v for k, v in nc._asdict().items()}


class OpposingSignals(Instrument):
    """Opposing-signal groups over one optimizer step: ``opposing_up_index``/``_delta``
    (top-k loss increases), ``opposing_down_index``/``_delta`` (top-k decreases) and
    ``loss_up_fraction``. Indices are the batch's example ids when the batch is
    ``(x, y, ids)``, else positions.

    Args:
        every: period in steps.
        start: first step at which it runs.
        k: size of each group.
        data: a fixed probe set instead of the batch.
    """

    name = "opposing"
    two_phase = True

    def __init__(self, every: int = 50, start: int = 0, *, k: int = 8, data: Any = None):
        super().__init__(every, start)
        if k < 1:
            raise ValueError(f"Invalid k: {k}")
        self.k, self.data = k, data
        self._before: Tensor | None = None  # the per-example losses seen by measure

    def _losses(self, ctx: StepContext) -> Tensor:
        x, y, _ = split_batch(_data(ctx, self.data))
        return basic.per_example_losses(ctx.model, ctx.loss_fn, x, y)

    def measure(self, ctx: StepContext) -> dict[str, Any]:
        # both evaluations in the measurement mode (not the captured training forward)
        self._before = self._losses(ctx)
        return {}

    def measure_after(self, ctx: StepContext) -> dict[str, Any]:
        before, self._before = self._before, None
        if before is None:
            return {}
        index = ctx.index if self.data is None else split_batch(self.data)[2]
        res = opposing_signals(before, self._losses(ctx), self.k, index)
        return {"opposing_up_index": res.increase_index, "opposing_up_delta": res.increase_delta,
                "opposing_down_index": res.decrease_index,
                "opposing_down_delta": res.decrease_delta,
                "loss_up_fraction": res.fraction_increased}


def default_instruments(optimizer: torch.optim.Optimizer | None = None, *,
                        classifier: str | None = None) -> list[Instrument]:
    """The default set and schedule, sized so that a 500-step run of a small MLP on digits
    (about 0.7 ms per step) costs at most about 1.10x (``benchmarks/monitor_overhead.py``):

    ============================================  =======  =====  ==========================
    instruments                                   every    start  cost/call (training steps)
    ============================================  =======  =====  ==========================
    loss (every step up to step 100)              10       0      ~0.02 + ~0.1 a record
    gradient norm                                 10       0      ~0.1
    layer norms, update, NLM alignment, logits    100      0      ~0.05-0.6 each
    coherence, noise scale, SNR (shared           500      0      ~9 together,
    per-example gradients), opposing signals                      ~1
    sharpness (warm-started Lanczos), Hessian     1000     1000   ~10-30 each
    trace (10 probes), Adam's preconditioned
    sharpness
    ============================================  =======  =====  ==========================

    Choices: the loss is recorded at every step for the first 100 steps, so a short run has
    a full loss curve (and an early divergence is seen at the step it happens), then every
    10 steps: a record at every step costs about 0.1-0.2 training steps of this model
    (building and writing the record costs more than reading the loss), i.e. 10-15% of a
    500-step run, over the budget. The Hessian instruments first run at
    step 1000, not at step 0, because one cold Lanczos run costs as much as the whole 10%
    budget of a 500-step run of that model (the benchmark prints the ratio with them at step
    0 as well); ``Monitor(every={"sharpness": 10})`` runs sharpness every 10 steps from step
    0. Costs are in units of one training step, so they carry over to other model sizes
    roughly. Neural collapse is added (every 500) when a ``classifier`` layer is named.

    Args:
        optimizer: Adam and AdamW add the preconditioned sharpness.
        classifier: name of the final ``nn.Linear`` (adds neural collapse).

    Example::

        >>> import torch
        >>> from gradkit.instruments import default_instruments
        >>> opt = torch.optim.Adam(torch.nn.Linear(2, 2).parameters())
        >>> [(i.name, i.every, i.start) for i in default_instruments(opt)][:3]
        [('loss', 10, 0), ('grad_norm', 10, 0), ('layer_grad_norms', 100, 0)]
    """
    out: list[Instrument] = [
        Loss(every=10, dense_until=100), GradNorm(every=10),
        LayerGradNorms(every=100), UpdateSize(every=100), NLMAlignment(every=100),
        LogitStats(every=100),
        Coherence(every=500), NoiseScale(every=500), GradientSNR(every=500),
        OpposingSignals(every=500),
        Sharpness(every=1000, start=1000), HessianTrace(every=1000, start=1000),
    ]
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        out.append(PreconditionedSharpness(every=1000, start=1000))
    if classifier is not None:
        out.append(NeuralCollapse(classifier, every=500))
    return out
