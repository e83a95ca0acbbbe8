"""M-FAC (Frantar, Kurtic, Alistarh, 2021): the dynamic matrix-free inverse of a damped
empirical Fisher built from the last m gradients, used as a preconditioner.

The curvature model and its matrix-free products are :class:`MFACInverse` (a window of m
gradients, optionally cut into blocks of coordinates); :class:`MFAC` is the thin
``torch.optim`` class around it, with ``_single_tensor_mfac`` / ``_multi_tensor_mfac`` for the
per-parameter part of the step (momentum and the parameter update).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from gradkit._checks import (
    check_impl_flags,
    check_in_interval,
    check_lr,
    check_non_negative,
    check_positive,
    check_positive_int,
)
from gradkit.optim._base import (
    GradkitOptimizer,
    evaluate_closure,
    reject_sparse,
    require_shared,
    resolve_impl,
    step_counter,
)
from gradkit.optim._registry import register

__all__ = ["MFAC", "MFACInverse"]


class MFACInverse:
    r"""Products with :math:`\hat F^{-1}`, :math:`\hat F = \lambda I + \frac1m \sum_{i=1}^m
    g_i g_i^\top`, over a ring buffer of the last ``m`` gradients, in :math:`O(md)` memory.

    With the gradients as the rows of :math:`G \in \mathbb{R}^{m \times d}`, Woodbury gives

    .. math::
        \hat F^{-1} x = \lambda^{-1} x - \lambda^{-2} G^\top A^{-1} G x, \qquad
        A = m I + \lambda^{-1} G G^\top \in \mathbb{R}^{m \times m},

    so a product costs two :math:`O(md)` matrix products and an :math:`O(m^2)` solve, and
    adding a gradient costs one :math:`O(md)` row of :math:`K = G G^\top` and an
    :math:`O(m^3)` refactorisation of :math:`A` -- the paper's dynamic algorithm. Its
    Sherman--Morrison recursion (:math:`H_0^{-1} = \lambda^{-1} I`, :math:`H_i^{-1} =
    H_{i-1}^{-1} - H_{i-1}^{-1} g_i g_i^\top H_{i-1}^{-1} / (m + g_i^\top H_{i-1}^{-1}
    g_i)`) is the unpivoted LU factorisation of :math:`A`: :math:`U_{ij} = m\delta_{ij} +
    g_i^\top H_{i-1}^{-1} g_j` (:math:`j \ge i`). The reference code computes that LU and
    a triangular coefficient matrix row by row (or with a CUDA kernel); :math:`A` is
    symmetric positive definite, so gradkit takes its Cholesky factor
    :math:`A = C C^\top` (:math:`U = \operatorname{diag}(C) C^\top`, the same
    denominators :math:`m + g_i^\top H_{i-1}^{-1} g_i = C_{ii}^2`) and applies
    :math:`A^{-1}` with two triangular solves -- tensor ops on any device (torch's unpivoted
    LU is CUDA-only).

    Block-wise variant (``blocksize``): the d coordinates are cut into contiguous blocks of
    ``blocksize`` (a trailing partial block is its own block, zero-padded, which leaves its
    products unchanged), and each block gets its own :math:`\hat F` from the matching slices
    of the same m gradients -- a block-diagonal :math:`\hat F`, with all blocks' m×m systems
    solved as one batch. ``blocksize=None`` is the global model of the M-FAC optimizer.

    The window starts as m zero rows and the factor :math:`1/m` always counts the full window
    (as the reference does), so during the first m steps :math:`\hat F = \lambda I +
    \frac1m \sum (\text{filled rows})`.

    Args:
        ngrads: window size m.
        dim: number of coordinates d.
        damp: damping :math:`\lambda > 0`.
        blocksize: coordinates per block (None: one block of all d).
        dtype, device: of the stored gradients and m×m systems.
    """

    def __init__(self, ngrads: int, dim: int, damp: float, blocksize: int | None = None, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
                 ) -> None:
        check_positive_int("ngrads", ngrads)
        check_positive("damp", damp)
        if blocksize is not None:
            check_positive_int("blocksize", blocksize)
        self.m, self.d, self.damp = ngrads, dim, float(damp)
        self.block = dim if blocksize is None else min(blocksize, dim)
        self.nblocks = -(-dim // self.block)
        padded = self.nblocks * self.block
        # window[b, i, :] = slice b of gradient i (each block's G_b contiguous); dots[b] = G_b G_bᵀ
        self.window = torch.zeros(self.nblocks, self.m, self.block, dtype=dtype, device=device)
        self.dots = torch.zeros(self.nblocks, self.m, self.m, dtype=dtype, device=device)
        self.last = 0  # ring-buffer row the next gradient overwrites
        self._padding = padded - dim
        self._chol: Tensor | None = None

    def _blocks(self, x: Tensor) -> Tensor:
        """(d,) -> (nblocks, block), zero-padded."""
        if self._padding:
            x = torch.cat([x, x.new_zeros(self._padding)])
        return x.view(self.nblocks, self.block)

    def update(self, g: Tensor) -> None:
        """Replace the oldest gradient of the window with ``g`` (shape (d,))."""
        gb = self._blocks(g)
        self.window[:, self.last].copy_(gb)
        row = torch.bmm(self.window, gb.unsqueeze(-1)).squeeze(-1)  # O(md): new row of K
        self.dots[:, self.last, :] = row
        self.dots[:, :, self.last] = row
        self.last = (self.last + 1) % self.m
        self._chol = None

    def _factor(self) -> Tensor:
        """Cholesky factors C of A = m I + λ⁻¹ K, one per block (O(m³) each)."""
        if self._chol is None:
            eye = torch.eye(self.m, dtype=self.dots.dtype, device=self.dots.device)
            self._chol = torch.linalg.cholesky(self.dots / self.damp + self.m * eye)
        return self._chol

    def mul(self, x: Tensor) -> Tensor:
        r""":math:`\hat F^{-1} x` for ``x`` of shape (d,)."""
        xb = self._blocks(x)
        q = torch.bmm(self.window, xb.unsqueeze(-1)) / self.damp  # λ⁻¹ G x, O(md)
        c = torch.cholesky_solve(q, self._factor())  # A⁻¹ q, O(m²)
        out = (xb - torch.bmm(c.transpose(1, 2), self.window).squeeze(1)) / self.damp
        return out.reshape(-1)[: self.d]

    def update_mul(self, g: Tensor) -> Tensor:
        """Insert ``g``, then return :math:`\\hat F^{-1} g` (the reference's ``update_mul``)."""
        self.update(g)
        return self.mul(g)

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "dots": self.dots, "last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = state["window"].to(self.window).view_as(self.window).clone()
        self.dots = state["dots"].to(self.dots).view_as(self.dots).clone()
        self.last = int(state["last"])
        self._chol = None


@register("mfac")
class MFAC(GradkitOptimizer):
    r"""M-FAC: SGD preconditioned by the inverse of a damped empirical Fisher of the last
    ``ngrads`` gradients (the dynamic algorithm).

    .. math::
        \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)}, \mu \text{ (momentum)},
                \omega \text{ (weight decay)}, m \text{ (ngrads)}, \lambda \text{ (damp)};
                \quad G \leftarrow 0 \in \mathbb{R}^{m \times d}, \ v_0 \leftarrow 0 \\
            &\textbf{for } t = 1, 2, \ldots \textbf{ do} \\
            &\hspace{5mm} \hat g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})
                + \omega \theta_{t-1} \ (\text{all parameters, flattened into one vector}) \\
            &\hspace{5mm} \text{replace the oldest row of } G \text{ by } \hat g_t \\
            &\hspace{5mm} u_t \leftarrow \big(\lambda I + \tfrac1m G^\top G\big)^{-1}
                \hat g_t \quad (\text{matrix-free, } O(md + m^3)) \\
            &\hspace{5mm} \textbf{if } \mu > 0: \ v_t \leftarrow \mu v_{t-1}
                + (1 - \mu) u_t, \quad u_t \leftarrow v_t \\
            &\hspace{5mm} \theta_t \leftarrow \theta_{t-1} - \gamma u_t
        \end{aligned}

    The products with :math:`(\lambda I + \frac1m G^\top G)^{-1}` are done without any d×d
    matrix (:class:`MFACInverse`: Woodbury over the m×m system, refactorised at each step).
    Memory: the m×d gradient window (m times the model), m×m matrices per block, and a
    momentum buffer when :math:`\mu > 0`.

    Args:
        params: iterable of parameters or dicts defining parameter groups. All parameters
            share one curvature model (one flattened vector, as in the reference);
            ``lr``, ``momentum`` and ``weight_decay`` may differ per group, ``ngrads``,
            ``damp`` and ``blocksize`` may not.
        lr: learning rate :math:`\gamma` (default: 1e-3).
        momentum: :math:`\mu \in [0, 1)`, an exponential average of the preconditioned
            directions (default: 0).
        weight_decay: L2 penalty :math:`\omega`, added to the gradient before
            preconditioning (default: 0).
        ngrads: window size m, the number of recent gradients kept (default: 1024).
        damp: damping :math:`\lambda > 0` (default: 1e-5). :math:`\lambda \hat F^{-1}
            \to I` as :math:`\lambda \to \infty`, so ``lr = λ·γ`` with a large ``damp`` is
            SGD with step :math:`\gamma`. The m×m system's condition number grows like
            :math:`\|g\|^2/(m\lambda)`: with the default damping, float32 parameters
            keep about 3–4 significant digits of the preconditioned step (measured on
            CUDA: 5.6e-4 relative to a float64 run after 20 steps); use float64 or a
            larger ``damp`` where that matters.
        blocksize: None (default) for the global model; an integer B cuts the flattened
            parameters into blocks of B coordinates with one curvature model each
            (block-diagonal :math:`\hat F`; m×m systems per block, batched), the variant
            the authors use for large models.
        maximize: maximize the objective instead of minimizing (default: False).
        foreach: use ``torch._foreach_*`` for the per-parameter part (None: torch's rule).

    Paper: E. Frantar, E. Kurtic, D. Alistarh, "M-FAC: Efficient Matrix-Free Approximations
    of Second-Order Information", NeurIPS 2021. Matches ``MFAC`` / ``HInvFastUpMulti`` of
    IST-DASLab/M-FAC ``optim.py`` (commit 835320e): the argument names and defaults; the
    decay added to the gradient before it enters the window; insert-then-multiply; the
    window starts as m zero rows with the factor 1/m counting all m rows; the momentum
    average :math:`\mu v + (1-\mu) u` of the preconditioned direction; one vector over all
    parameters.

    Choices: the m×m system is factorised by Cholesky instead of the reference's unpivoted
    LU (the same factorisation of a positive definite matrix; see :class:`MFACInverse`);
    ``closure`` is supported (the reference refuses it); parameters whose gradient is None
    enter the window as zeros and are not updated; the reference's ``sparse`` mode (weights
    that start at exactly 0 are left out), multi-GPU split and CUDA kernel are not provided.
    The block-wise variant comes from the authors' pruning code (``HInvFastBlock``), where
    it is static; here it is the same dynamic window per block. The window and systems are
    kept in the parameters' dtype (all parameters must share dtype and device); on CUDA
    enable float64 or disable TF32 for accuracy, as the reference does.
    State: ``step``, ``window`` (blocks × m × B), ``dots`` (blocks × m × m) and ``last``
    in the first parameter's state; ``momentum_buffer`` per parameter when
    :math:`\mu > 0`.

    Example (first step, m = 4, λ = 1, g = (1, 2, 2): :math:`\hat F^{-1} g = g / (1 + 9/4)`)::

        >>> import torch
        >>> from gradkit.optim import MFAC
        >>> theta = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        >>> opt = MFAC([theta], lr=1.0, ngrads=4, damp=1.0)
        >>> theta.grad = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
        >>> opt.step()
        >>> print([round(v, 5) for v in theta.tolist()])
        [-0.30769, -0.61538, -0.61538]
    """

    _name = "MFAC"

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3,
                 momentum: float = 0.0, weight_decay: float = 0.0, ngrads: int = 1024,
                 damp: float = 1e-5, blocksize: int | None = None, *,
                 maximize: bool = False, foreach: bool | None = None) -> None:
        check_lr(lr)
        check_in_interval("momentum", momentum, 0.0, 1.0)
        check_non_negative("weight_decay", weight_decay)
        check_positive_int("ngrads", ngrads)
        check_positive("damp", damp)
        if blocksize is not None:
            check_positive_int("blocksize", blocksize)
        check_impl_flags(foreach, None, False)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ngrads=ngrads,
                        damp=damp, blocksize=blocksize, maximize=maximize, foreach=foreach,
                        fused=None)
        super().__init__(params, defaults)
        require_shared(self, ("ngrads", "damp", "blocksize"),
                       "all parameter groups share one curvature model")
        all_params = self._all_params()
        if len({(p.dtype, p.device) for p in all_params}) > 1:
            raise ValueError("MFAC needs all parameters on one device with one dtype")
        self._inverse: MFACInverse | None = None

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_inverse", None) is not None:
            raise RuntimeError("MFAC cannot add a parameter group after the first step "
                               "(the gradient window has a fixed size)")
        super().add_param_group(param_group)

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _curvature(self) -> MFACInverse:
        """The :class:`MFACInverse`, created (or restored from the state) on first use."""
        params = self._all_params()
        anchor = self.state[params[0]]
        if self._inverse is None:
            group = self.param_groups[0]
            self._inverse = MFACInverse(
                group["ngrads"], sum(p.numel() for p in params), group["damp"],
                group["blocksize"], dtype=params[0].dtype, device=params[0].device)
            if "window" in anchor:  # loaded by load_state_dict
                self._inverse.load_state_dict(anchor)
        anchor.update(self._inverse.state_dict())
        return self._inverse

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._inverse = None

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._inverse = None  # rebuilt from the state on the next step

    @torch.no_grad()
    def step(self, closure: Callable[[], object] | None = None) -> object:
        """Perform one optimisation step; ``closure`` re-evaluates and returns the loss."""
        loss = evaluate_closure(closure)
        params = self._all_params()
        if not any(p.grad is not None for p in params):
            return loss
        flat = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    flat.append(p.new_zeros(p.numel()))
                    continue
                reject_sparse(self._name, p.grad)
                g = -p.grad if group["maximize"] else p.grad
                if group["weight_decay"] != 0:
                    g = g.add(p, alpha=group["weight_decay"])
                flat.append(g.reshape(-1))
        inverse = self._curvature()
        direction = inverse.update_mul(torch.cat(flat))
        self.state[params[0]].update(inverse.state_dict())
        offset = 0
        for group in self.param_groups:
            chosen, pieces, buffers = [], [], []
            for p in group["params"]:
                piece = direction[offset: offset + p.numel()].view_as(p)
                offset += p.numel()
                if p.grad is None:
                    continue
                state = self.state[p]
                step_counter(state, p).add_(1)
                if group["momentum"] > 0 and "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                chosen.append(p)
                pieces.append(piece)
                buffers.append(state.get("momentum_buffer"))
            if not chosen:
                continue
            update = (_multi_tensor_mfac if resolve_impl(chosen, group["foreach"], None)
                      == "foreach" else _single_tensor_mfac)
            update(chosen, pieces, buffers, lr=float(group["lr"]),
                   momentum=group["momentum"])
        return loss


def _single_tensor_mfac(params: list[Tensor], directions: list[Tensor],
                        momentum_buffers: list[Tensor | None], *, lr: float,
                        momentum: float) -> None:
    """``directions``: the slices of :math:`u_t = \\hat F^{-1} \\hat g_t` of each tensor."""
    for param, u, buf in zip(params, directions, momentum_buffers):
        if momentum > 0:
            buf.lerp_(u, 1 - momentum)  # v ← μ v + (1 − μ) u
            u = buf
        param.add_(u, alpha=-lr)


def _multi_tensor_mfac(params: list[Tensor], directions: list[Tensor],
                       momentum_buffers: list[Tensor | None], *, lr: float,
                       momentum: float) -> None:
    if momentum > 0:
        torch._foreach_lerp_(momentum_buffers, directions, 1 - momentum)
        directions = momentum_buffers
    torch._foreach_add_(params, directions, alpha=-lr)
