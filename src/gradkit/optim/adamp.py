"""AdamP and SGDP (Heo et al., ICLR 2021): updates projected off the radial direction of
scale-invariant weights, so normalisation layers cannot shrink the effective step size."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from gradkit.optim import _fused
from gradkit.optim._base import (
    check_betas,
    check_eps,
    check_impl_flags,
    check_in_interval,
    check_lr,
    check_non_negative,
    maybe_negate,
    scale_,
    step_counter,
)
from gradkit.optim._moments import init_adam_state, update_adam_moments
from gradkit.optim._native import AdamPKernels, adamp_kernels
from gradkit.optim._projection import (
    Plan,
    cut_by_plan,
    eager_plans,
    project_tensors,
    projection_coefficients,
)
from gradkit.optim._registry import register

__all__ = ["SGDP", "AdamP"]

_REF = """Paper: B. Heo, S. Chun, S. J. Oh, D. Han, S. Yun, G. Kim, Y. Uh, J.-W. Ha, "AdamP: Slowing
    Down the Slowdown for Momentum Optimizers on Scale-invariant Weights", ICLR 2021. Matches
    ``{file}`` of clovaai/AdamP (commit 146287b); the projection is
    :func:`gradkit.optim._projection.project` (channel view first, then layer view; tested on
    the raw gradient, applied to the update). Tensors with ``ndim <= 1`` are never projected
    and get full weight decay."""


class _ProjectedOptimizer(_fused.MultiPathOptimizer):
    """Shared tail of AdamP and SGDP: projection, scaled decoupled decay, parameter step."""

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)

    def _decay(self, group: dict) -> tuple[float, float]:
        """(factor without projection, factor with projection) for ``p <- p * factor``."""
        raise NotImplementedError

    def _advance(self, params: list[Tensor]) -> list[float]:
        """Step counts after this step, one per param."""
        raise NotImplementedError

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor],
                steps: list[float], plans: list[Plan], states: list[list[Tensor]],
                foreach: bool) -> None:
        """The method's step on (pieces of) tensors, ending in :meth:`_finish`."""
        raise NotImplementedError

    def _eager(self, group: dict, params: list[Tensor], grads: list[Tensor],
               states: list[list[Tensor]], foreach: bool) -> None:
        """Loop / foreach step. Large CPU weights are tested first, from ``p`` and ``g``
        alone (:func:`~gradkit.optim._projection.eager_plans`); those whose update is then
        known to act row by row (not projected, or channel-projected) are cut into pieces of
        whole rows, and the whole step runs one cache-sized piece at a time, so every op
        after the first reads from cache instead of memory."""
        steps = self._advance(params)
        grads = maybe_negate(grads, group["maximize"], foreach)
        plans = eager_plans(params, grads, group["delta"], group["eps"])
        lists, plans, steps = cut_by_plan([params, grads, *states], plans, steps)
        for part in _fused.cache_slices(lists[0]):
            self._update(group, lists[0][part], lists[1][part], steps[part], plans[part],
                         [ts[part] for ts in lists[2:]], foreach)

    def _finish(self, group: dict, params: list[Tensor], grads: list[Tensor],
                nums: list[Tensor], denoms: list[Tensor] | None, step_sizes: list[float],
                plans: list[Plan], foreach: bool) -> list[Tensor | None]:
        """Project, decay and step (per tensor, or with foreach ops).

        The update direction of tensor ``i`` is ``nums[i] / denoms[i]`` (``nums[i]`` when
        ``denoms`` is None). It is materialised only where it may be projected; elsewhere the
        step is one ``addcdiv_`` / ``add_``. Returns, per tensor, the projected direction
        (``None`` where it was not projected).
        """
        def direction(i: int) -> Tensor:
            return nums[i] if denoms is None else nums[i] / denoms[i]

        projected, passed = project_tensors(params, grads, direction, group["delta"],
                                            group["eps"], plans)
        plain, scaled = self._decay(group)
        rest = [i for i, u in enumerate(projected) if u is None]
        if plain != 1.0 or scaled != 1.0:
            scale_([params[i] for i in rest], plain, foreach)
            for i, u in enumerate(projected):
                if u is None:
                    continue
                ok = passed[i]
                if isinstance(ok, Tensor):  # branch-free path (no host sync)
                    factors = torch.tensor([plain, scaled], dtype=params[i].dtype,
                                           device=ok.device)
                    params[i].mul_(factors[ok.long()])
                else:
                    params[i].mul_(scaled if ok else plain)
        for i, u in enumerate(projected):
            if u is not None:
                params[i].add_(u, alpha=-step_sizes[i])
        ps, sizes = [params[i] for i in rest], [-step_sizes[i] for i in rest]
        if not ps:
            return projected
        if denoms is None:
            if foreach and len(set(sizes)) == 1:
                torch._foreach_add_(ps, [nums[i] for i in rest], alpha=sizes[0])
            else:
                for i, size in zip(rest, sizes):
                    params[i].add_(nums[i], alpha=size)
        elif foreach:
            torch._foreach_addcdiv_(ps, [nums[i] for i in rest], [denoms[i] for i in rest],
                                    sizes)
        else:
            for i, size in zip(rest, sizes):
                params[i].addcdiv_(nums[i], denoms[i], value=size)
        return projected


@register("adamp")
class AdamP(_ProjectedOptimizer):
    r"""AdamP: Adam with the update projected off the weight direction when the weight is
    scale-invariant, and decoupled weight decay reduced by ``wd_ratio`` when it is.

    .. math::
        \begin{aligned}
            &\textbf{for } t = 1, 2, \ldots \textbf{ do} \\
            &\hspace{5mm} g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})
                \ (\text{negated if maximize}) \\
            &\hspace{5mm} m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
                v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
            &\hspace{5mm} d_t \leftarrow \sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon \\
            &\hspace{5mm} u_t \leftarrow m_t / d_t \quad
                (\text{nesterov: } (\beta_1 m_t + (1 - \beta_1) g_t) / d_t) \\
            &\hspace{5mm} (u_t, r) \leftarrow \operatorname{proj}(\theta_{t-1}, g_t, u_t;
                \delta, \text{wd\_ratio}) \ \text{if } \theta.\text{ndim} > 1
                \text{ else } (u_t, 1) \\
            &\hspace{5mm} \theta_t \leftarrow \theta_{t-1} (1 - \gamma \lambda r)
                - \frac{\gamma}{1 - \beta_1^t} u_t
        \end{aligned}

    {ref}

    ``fused=True`` runs a ``torch.compile``'d kernel per group of same-shaped tensors (the
    projection's data-dependent choice is a ``torch.where``, so no host sync); compiled once,
    hyperparameters passed as tensors so lr schedules do not recompile. Per weight it makes two
    passes over memory: the row reductions (reading p, g, m, v: 16 bytes/param in fp32), then
    the update of p, m, v (28 bytes/param); the projected direction is recomputed, not stored.
    On CPU, large float32/float64 weights instead take a hand-written two-pass C kernel
    (:mod:`gradkit.optim._native`, built on first use; the compiled kernel is the fallback):
    pass 1 reads p, g, m, v once, updates m, v and writes the unprojected direction into a
    scratch buffer the size of the largest weight while it sums the rows; pass 2 reads p and
    the direction and writes p, rows in reverse so that it starts on what is still in cache.
    Inductor cannot fuse the moment updates into the row reductions, which is what this saves.
    The eager paths test large CPU weights from p and g before building any update, and run
    the step in cache-sized pieces of rows (see ``_ProjectedOptimizer._eager``).
    State per parameter: ``step`` (float32 CPU scalar tensor), ``exp_avg``, ``exp_avg_sq``.
    """

    _name = "AdamP"

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, delta: float = 0.1, wd_ratio: float = 0.1,
                 nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, fused: bool | None = None) -> None:
        check_lr(lr)
        check_betas(betas)
        check_eps(eps)
        check_non_negative("weight_decay", weight_decay)
        check_non_negative("delta", delta)
        check_in_interval("wd_ratio", wd_ratio, 0.0, 1.0, closed_high=True)
        check_impl_flags(foreach, fused, False)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta,
                        wd_ratio=wd_ratio, nesterov=nesterov, maximize=maximize,
                        foreach=foreach, fused=fused)
        super().__init__(params, defaults)

    def _decay(self, group: dict) -> tuple[float, float]:
        lr_wd = float(group["lr"]) * group["weight_decay"]
        return 1.0 - lr_wd, 1.0 - lr_wd * group["wd_ratio"]

    def _init_state(self, params: list[Tensor]) -> tuple[list[Tensor], ...]:
        steps, exp_avgs, exp_avg_sqs = [], [], []
        for p in params:
            state = self.state[p]
            steps.append(step_counter(state, p))
            init_adam_state(state, p)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
        return steps, exp_avgs, exp_avg_sqs

    def _loop(self, group: dict, params: list[Tensor], grads: list[Tensor],
              steps: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor]) -> None:
        self._eager(group, params, grads, [exp_avgs, exp_avg_sqs], foreach=False)

    def _foreach(self, group: dict, params: list[Tensor], grads: list[Tensor],
                 steps: list[Tensor], exp_avgs: list[Tensor],
                 exp_avg_sqs: list[Tensor]) -> None:
        self._eager(group, params, grads, [exp_avgs, exp_avg_sqs], foreach=True)

    def _advance(self, params: list[Tensor]) -> list[float]:
        return _fused.advance_packed_steps(self, params)

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor],
                steps: list[float], plans: list[Plan], states: list[list[Tensor]],
                foreach: bool) -> None:
        """Moments, then the projected step. The bias corrections are folded into eps and
        the step size: ``m / (sqrt(v / bc2) + eps) / bc1 = c * m / (sqrt(v) + eps sqrt(bc2))``
        with ``c = sqrt(bc2) / bc1``, which saves one pass over ``v`` (the projection is
        linear in the update, so the scale commutes with it)."""
        lr, (beta1, beta2), eps = float(group["lr"]), group["betas"], group["eps"]
        exp_avgs, exp_avg_sqs = states
        update_adam_moments(exp_avgs, exp_avg_sqs, grads, beta1, beta2, foreach)
        root_bc2 = [math.sqrt(1.0 - beta2**s) for s in steps]
        if foreach:
            denoms = list(torch._foreach_sqrt(exp_avg_sqs))
            torch._foreach_add_(denoms, [eps * r for r in root_bc2])
            nums = (list(torch._foreach_lerp(exp_avgs, grads, 1.0 - beta1))
                    if group["nesterov"] else exp_avgs)
        else:
            denoms = [v.sqrt().add_(eps * r) for v, r in zip(exp_avg_sqs, root_bc2)]
            nums = ([torch.lerp(m, g, 1.0 - beta1) for m, g in zip(exp_avgs, grads)]
                    if group["nesterov"] else exp_avgs)
        sizes = [lr * r / (1.0 - beta1**s) for s, r in zip(steps, root_bc2)]
        self._finish(group, params, grads, nums, denoms, sizes, plans, foreach)

    def _fused(self, group: dict, params: list[Tensor], grads: list[Tensor],
               steps: list[Tensor], exp_avgs: list[Tensor],
               exp_avg_sqs: list[Tensor]) -> None:
        lr, (beta1, beta2), eps = float(group["lr"]), group["betas"], group["eps"]
        plain, projected = self._decay(group)
        kernel = _fused.compiled(_adamp_kernel)
        rows = [p.ndim > 1 for p in params]
        step_values = _fused.advance_packed_steps(self, params)
        native = adamp_kernels() if params[0].device.type == "cpu" else None
        for step, idx in _fused.indices_by_value(step_values).items():
            hyper = (-1.0 if group["maximize"] else 1.0, 1.0 - beta1, beta2, 1.0 - beta2,
                     1.0 / math.sqrt(1.0 - beta2**step), eps)
            neg_step = -lr / (1.0 - beta1**step)
            if native is not None:
                idx = [i for i in idx if not self._native_step(
                    native, group, params[i], grads[i], hyper, neg_step, rows[i])]
                if not idx:
                    continue
            s = _fused.scalars((*hyper, neg_step, group["delta"] ** 2, plain, projected),
                               params[0])
            _fused.apply_rows(self, kernel, params, grads, ("exp_avg", "exp_avg_sq"), rows, s,
                              group["nesterov"], indices=idx)

    def _native_step(self, native: AdamPKernels, group: dict, p: Tensor, g: Tensor,
                     hyper: tuple[float, ...], neg_step: float, row_structured: bool,
                     ) -> bool:
        """The hand-written two-pass kernel (:mod:`gradkit.optim._native`) for one large
        CPU weight; False (nothing done) where it does not apply."""
        state = self.state[p]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if not (row_structured and p.numel() >= _fused.BIG_NUMEL
                and native.supports(p, g, m, v)):
            return False
        scratches = self.__dict__.setdefault("_gradkit_scratch", {})  # not pickled
        scratch = scratches.get(p.dtype)
        if scratch is None or scratch.numel() < p.numel():
            scratch = scratches[p.dtype] = torch.empty(p.numel(), dtype=p.dtype)
        u, rows = scratch[:p.numel()], p.shape[0]
        sums = native.pass1(p, g, m, v, u, rows, hyper, group["nesterov"])
        coef, hit = native.decide(sums, p.numel() // rows, group["delta"] ** 2, group["eps"])
        plain, projected = self._decay(group)
        native.pass2(p, u, coef, rows, projected if hit else plain, neg_step)
        return True


def _project_and_step(p: Tensor, g: Tensor, direction: Callable[[], Tensor], eps: Tensor,
                      delta_sq: Tensor, plain: Tensor, projected: Tensor, neg_step: Tensor,
                      rows: bool) -> Tensor:
    """Kernel tail shared by AdamP and SGDP (tensors are ``(N, C, D)``); returns final ``u``.

    ``direction()`` builds the unprojected update elementwise from the (old) state. It is
    traced twice, inside the row reductions and in the update pass, so inductor recomputes it
    in each pass instead of storing it: one reduction pass reading ``p, g`` and the state, then
    one elementwise pass that updates ``p`` and the state.
    """
    if not rows:
        u = direction()
        p.copy_(p * plain + neg_step * u)
        return u
    coef, ok = projection_coefficients(p, g, direction(), delta_sq, eps)
    factor = torch.where(ok, projected, plain).view(-1, 1, 1)
    u = direction() - p * coef
    p.copy_(p * factor + neg_step * u)
    return u


def _adamp_kernel(p: Tensor, g: Tensor, m: Tensor, v: Tensor, s: Tensor, nesterov: bool,
                  *, rows: bool) -> None:
    """Fused AdamP; ``s`` = (sign, 1-β1, β2, 1-β2, 1/√bc2, eps, -lr/bc1, δ², decay,
    decay_proj); multiplying by 1/√bc2 saves a vector division per element and pass."""
    g = g * s[0]

    def moments() -> tuple[Tensor, Tensor]:
        return m + (g - m) * s[1], v * s[2] + g * g * s[3]

    def direction() -> Tensor:
        m_new, v_new = moments()
        num = m_new + (g - m_new) * s[1] if nesterov else m_new
        return num / (v_new.sqrt() * s[4] + s[5])

    _project_and_step(p, g, direction, s[5], s[7], s[8], s[9], s[6], rows)
    m_new, v_new = moments()
    m.copy_(m_new)
    v.copy_(v_new)


@register("sgdp")
class SGDP(_ProjectedOptimizer):
    r"""SGDP: SGD with momentum whose update is projected off the weight direction when the
    weight is scale-invariant, with decoupled weight decay reduced by ``wd_ratio`` then.

    .. math::
        \begin{aligned}
            &\textbf{for } t = 1, 2, \ldots \textbf{ do} \quad (b_0 = 0) \\
            &\hspace{5mm} g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})
                \ (\text{negated if maximize}) \\
            &\hspace{5mm} b_t \leftarrow \mu b_{t-1} + (1 - \tau) g_t \\
            &\hspace{5mm} d_t \leftarrow g_t + \mu b_t \text{ if nesterov else } b_t \\
            &\hspace{5mm} (d_t, r) \leftarrow \operatorname{proj}(\theta_{t-1}, g_t, d_t;
                \delta, \text{wd\_ratio}) \ \text{if } \theta.\text{ndim} > 1
                \text{ else } (d_t, 1) \\
            &\hspace{5mm} \theta_t \leftarrow \theta_{t-1}
                \Big(1 - \frac{\gamma \lambda r}{1 - \mu}\Big) - \gamma d_t
        \end{aligned}

    {ref}

    Unlike ``torch.optim.SGD`` the momentum buffer starts at zero (so the first step is
    :math:`(1 - \tau) g_1`) and exists even with ``momentum=0``; note the :math:`1/(1-\mu)`
    decay factor. ``lr`` is required, as in the reference. As in the authors' ``sgdp.py``
    (which projects the buffer tensor in place), with ``nesterov=False`` a projected step also
    stores the projected direction as the momentum buffer (the paper's algorithm keeps the
    unprojected buffer; we follow the code that produced the published results).
    Choice: like ``torch.optim.SGD``, ``nesterov=True`` requires ``momentum > 0`` and
    ``dampening = 0`` (ValueError otherwise).
    State per parameter: ``momentum_buffer``.
    """

    _name = "SGDP"

    def __init__(self, params: Iterable[Any], lr: float | Tensor, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 eps: float = 1e-8, delta: float = 0.1, wd_ratio: float = 0.1, *,
                 maximize: bool = False, foreach: bool | None = None,
                 fused: bool | None = None) -> None:
        check_lr(lr)
        check_in_interval("momentum", momentum, 0.0, 1.0)
        check_in_interval("dampening", dampening, 0.0, 1.0, closed_high=True)
        check_non_negative("weight_decay", weight_decay)
        check_eps(eps)
        check_non_negative("delta", delta)
        check_in_interval("wd_ratio", wd_ratio, 0.0, 1.0, closed_high=True)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        check_impl_flags(foreach, fused, False)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, eps=eps, delta=delta,
                        wd_ratio=wd_ratio, maximize=maximize, foreach=foreach, fused=fused)
        super().__init__(params, defaults)

    def _decay(self, group: dict) -> tuple[float, float]:
        lr_wd = float(group["lr"]) * group["weight_decay"] / (1.0 - group["momentum"])
        return 1.0 - lr_wd, 1.0 - lr_wd * group["wd_ratio"]

    def _init_state(self, params: list[Tensor]) -> tuple[list[Tensor], ...]:
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p,
                                                            memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        return (bufs,)

    def _loop(self, group: dict, params: list[Tensor], grads: list[Tensor],
              bufs: list[Tensor]) -> None:
        self._eager(group, params, grads, [bufs], foreach=False)

    def _foreach(self, group: dict, params: list[Tensor], grads: list[Tensor],
                 bufs: list[Tensor]) -> None:
        self._eager(group, params, grads, [bufs], foreach=True)

    def _advance(self, params: list[Tensor]) -> list[float]:
        return [0.0] * len(params)  # SGDP keeps no step count

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor],
                steps: list[float], plans: list[Plan], states: list[list[Tensor]],
                foreach: bool) -> None:
        mu, damp, nesterov = group["momentum"], group["dampening"], group["nesterov"]
        (bufs,) = states
        if foreach:
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, grads, alpha=1.0 - damp)
            updates = list(torch._foreach_add(grads, bufs, alpha=mu)) if nesterov else bufs
        else:
            for g, buf in zip(grads, bufs):
                buf.mul_(mu).add_(g, alpha=1.0 - damp)
            updates = [g.add(b, alpha=mu) for g, b in zip(grads, bufs)] if nesterov else bufs
        # without nesterov the update IS the buffer: as in the reference, it gets projected
        projected = self._finish(group, params, grads, updates, None,
                                 [float(group["lr"])] * len(params), plans, foreach)
        if not nesterov:
            for buf, u in zip(bufs, projected):
                if u is not None and u.data_ptr() != buf.data_ptr():  # projected in a stack
                    buf.copy_(u)

    def _fused(self, group: dict, params: list[Tensor], grads: list[Tensor],
               bufs: list[Tensor]) -> None:
        plain, projected = self._decay(group)
        s = _fused.scalars((-1.0 if group["maximize"] else 1.0, group["momentum"],
                            1.0 - group["dampening"], group["eps"], group["delta"] ** 2, plain,
                            projected, -float(group["lr"])), params[0])
        _fused.apply_rows(self, _fused.compiled(_sgdp_kernel), params, grads,
                          ("momentum_buffer",), [p.ndim > 1 for p in params], s,
                          group["nesterov"])


def _sgdp_kernel(p: Tensor, g: Tensor, buf: Tensor, s: Tensor, nesterov: bool, *,
                 rows: bool) -> None:
    """Fused SGDP; ``s`` = (sign, μ, 1-dampening, eps, δ², decay, decay_proj, -lr)."""
    g = g * s[0]

    def momentum() -> Tensor:
        return buf * s[1] + g * s[2]

    def direction() -> Tensor:
        return g + momentum() * s[1] if nesterov else momentum()

    d = _project_and_step(p, g, direction, s[3], s[4], s[5], s[6], s[7], rows)
    buf.copy_(momentum() if nesterov else d)  # the reference projects the buffer in place


AdamP.__doc__ = (AdamP.__doc__ or "").replace("{ref}", _REF.format(file="adamp/adamp.py"))
SGDP.__doc__ = (SGDP.__doc__ or "").replace("{ref}", _REF.format(file="adamp/sgdp.py"))
