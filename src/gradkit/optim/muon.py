"""Muon (MomentUm Orthogonalized by Newton–Schulz) with an auxiliary AdamW, in one optimizer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw

from gradkit._checks import (
    check_betas,
    check_eps,
    check_in_interval,
    check_lr,
    check_non_negative,
    check_positive_int,
)
from gradkit.optim._base import evaluate_closure, group_gradients, step_counter, tensor_steps
from gradkit.optim._moments import init_adam_state
from gradkit.optim._registry import register
from gradkit.optim.adagrad_norm import scalar_lr
from gradkit.optim.newton_schulz import newton_schulz5, ns_dtype_name

# group key of an auxiliary (use_muon=False) group -> constructor default it falls back to
_AUX_DEFAULT_KEYS = {
    "lr": "adamw_lr",
    "betas": "adamw_betas",
    "eps": "adamw_eps",
    "weight_decay": "adamw_weight_decay",
}


# On CPU, stacking same-shaped matrices into one batched NS5 call pays only for small ones
# (measured, 1 thread: 16 × 64² bf16 10× faster batched; 6 × 512² 1.7× slower batched).
CPU_BATCH_MAX_NUMEL = 1 << 13


def _batchable(matrix: Tensor) -> bool:
    return matrix.device.type != "cpu" or matrix.numel() <= CPU_BATCH_MAX_NUMEL


def _as_matrix(t: Tensor) -> Tensor:
    """A ≥2-D tensor as the matrix Muon orthogonalises: ``(shape[0], -1)``."""
    return t if t.ndim == 2 else t.reshape(t.size(0), -1)


def muon_scale(rows: int, cols: int) -> float:
    """Muon's shape factor ``sqrt(max(1, rows / cols))`` for a ``rows × cols`` update."""
    return max(1.0, rows / cols) ** 0.5


@register("muon")
class Muon(torch.optim.Optimizer):
    r"""Muon for matrix parameters, with AdamW for the rest (``use_muon=False`` groups).

    .. math::
        \begin{aligned}
            &\textbf{Muon groups } (\texttt{use\_muon=True}, \text{every param } \geq 2\text{-D}):\\
            &\quad M_t \leftarrow \beta M_{t-1} + (1-\beta) G_t \qquad (\text{lerp}, M_0 = 0)\\
            &\quad U_t \leftarrow (1-\beta) G_t + \beta M_t \ \text{if nesterov else } M_t\\
            &\quad O_t \leftarrow \mathrm{NS5}\big(\mathrm{reshape}(U_t, (\text{rows}, -1))\big)
                \cdot \sqrt{\max(1, \text{rows}/\text{cols})}\\
            &\quad \theta_t \leftarrow \theta_{t-1}(1 - \gamma\lambda) - \gamma\, O_t\\
            &\textbf{AdamW groups } (\texttt{use\_muon=False}):\\
            &\quad m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
                v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2\\
            &\quad \theta_t \leftarrow \theta_{t-1}(1 - \gamma\lambda) - \gamma\,
                \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}
        \end{aligned}

    Paper: K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024).
    Reference matched: ``KellerJordan/Muon`` ``muon.py`` (``Muon``/``MuonWithAuxAdam``,
    ``zeropower_via_newtonschulz5``): NS5 coefficients (3.4445, −4.7750, 2.0315), bfloat16
    iteration, transpose when rows > cols, normalisation by ``||X||_F + 1e-7``, lerp momentum,
    the aux-Adam defaults (lr 3e-4, betas (0.9, 0.95), eps 1e-10, both moments bias-corrected).

    Parameter groups carry a ``use_muon`` flag (default True). Groups with ``use_muon=False``
    run AdamW and take their ``lr`` / ``betas`` / ``eps`` / ``weight_decay`` from the group or
    else from ``adamw_lr`` / ``adamw_betas`` / ``adamw_eps`` / ``adamw_weight_decay``. A 0-/1-D
    tensor in a Muon group raises ``ValueError``; :func:`muon_param_groups` splits a model the
    usual way (hidden matrices -> Muon; embeddings, head, first conv, 0/1-D -> AdamW)::

        opt = Muon(muon_param_groups(model), lr=0.02, weight_decay=0.01, adamw_lr=3e-4)

    Choices (documented deviations from the reference):

    * **Conv / ≥3-D weights** are flattened to ``(shape[0], -1)`` and the shape factor uses
      that flattened matrix: ``sqrt(max(1, out / (in·k_h·k_w)))``. The reference computes the
      factor from ``size(-2)/size(-1)`` of the 4-D gradient (kernel height / width), i.e. 1 for
      square kernels; the two agree unless ``out > in·k_h·k_w``. The reference flattens only
      4-D tensors; here conv1d/conv3d weights are flattened the same way.
    * **grad None**: the parameter is skipped (no momentum decay, no weight decay), as torch
      optimizers do. The reference zero-fills the gradient (for distributed synchronisation).
    * ``p.grad`` is never modified (the reference overwrites it with the Nesterov update).
    * Small same-shaped matrices (same ``ns_steps`` and ``ns_dtype``) are stacked and
      orthogonalised in one batched NS5 call (on CPU up to ``CPU_BATCH_MAX_NUMEL`` elements,
      where batching pays; always on other devices).
    * ``maximize`` negates the gradient (both Muon and AdamW groups).
    * The AdamW groups run torch's own functional AdamW (``torch.optim.adamw.adamw``), so
      they take exactly the steps of ``torch.optim.AdamW`` and keep its state keys
      (``step``, ``exp_avg``, ``exp_avg_sq``).

    As ``torch.optim``: ``model.named_parameters()`` (flat or inside groups) is accepted and
    the names are kept (``param_names``); ``lr`` may be a 1-element Tensor (any shape), which
    torch refuses together with ``foreach=True`` (``ValueError``), and so does Muon; a
    ``state_dict`` whose ``step`` values are Python numbers, or whose groups lack a flag
    added later, loads (``__setstate__`` fills in the defaults).

    Example (one step from zero: ``U = 0.0975·G``, NS5 maps the singular value 1 to 0.6964)::

        >>> import torch
        >>> from gradkit.optim import Muon
        >>> p = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
        >>> opt = Muon([p], lr=0.02, ns_dtype="float64")
        >>> p.grad = torch.diag(torch.tensor([2.0, 0.0], dtype=torch.float64))
        >>> opt.step()
        >>> print(f"{p[0, 0].item():.6f} {p[1, 1].item():.1f}")  # ≈ -0.02 · 0.6964
        -0.013929 0.0

    Args:
        params: iterable of parameters or named_parameters to optimize, or dicts defining
            parameter groups (a group may carry ``use_muon``, default True).
        lr (float, Tensor, optional): Muon learning rate :math:`\gamma`; a float or a
            1-element Tensor (default: 0.02).
        momentum: momentum factor :math:`\beta` (default: 0.95).
        nesterov: use the Nesterov-style update :math:`U_t` (default: True).
        ns_steps: number of Newton–Schulz iterations (default: 5).
        weight_decay: decoupled weight decay :math:`\lambda` of the Muon groups (default: 0).
        adamw_lr: learning rate of ``use_muon=False`` groups without their own ``lr``
            (default: 3e-4).
        adamw_betas: their :math:`(\beta_1, \beta_2)` (default: (0.9, 0.95)).
        adamw_eps: their :math:`\epsilon` (default: 1e-10).
        adamw_weight_decay: their decoupled weight decay (default: 0).
        ns_dtype: working dtype of Newton–Schulz, ``"bfloat16"`` as the reference,
            ``"float32"`` or ``"float64"`` (default: "bfloat16").
        maximize: maximize the objective instead of minimizing (default: False).
        foreach: use the ``torch._foreach_*`` implementation; None picks it on CUDA-class
            devices only, as torch does (default: None).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        *,
        adamw_lr: float | Tensor = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-10,
        adamw_weight_decay: float = 0.0,
        ns_dtype: str | torch.dtype = "bfloat16",
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        check_lr(adamw_lr)
        _check_tensor_lr(adamw_lr, foreach)
        check_betas(adamw_betas)
        check_eps(adamw_eps, "adamw_eps")
        check_non_negative("adamw_weight_decay", adamw_weight_decay)
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
            weight_decay=weight_decay, ns_dtype=ns_dtype_name(ns_dtype), use_muon=True,
            adamw_lr=adamw_lr, adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay, maximize=maximize, foreach=foreach,
        )
        self._check_muon_hyper(defaults)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("use_muon", True)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("nesterov", True)
            group.setdefault("ns_steps", 5)
            group.setdefault("ns_dtype", "bfloat16")
        tensor_steps(self)

    @staticmethod
    def _check_muon_hyper(group: dict) -> None:
        check_lr(group["lr"])
        _check_tensor_lr(group["lr"], group["foreach"])
        check_in_interval("momentum", group["momentum"], 0.0, 1.0)
        check_positive_int("ns_steps", group["ns_steps"])
        check_non_negative("weight_decay", group["weight_decay"])
        group["ns_dtype"] = ns_dtype_name(group["ns_dtype"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        param_group["params"] = [params] if isinstance(params, Tensor) else list(params)
        # (name, tensor) pairs from named_parameters(): torch's add_param_group unpacks them
        tensors = [p[1] if isinstance(p, tuple) else p for p in param_group["params"]]
        if not param_group.setdefault("use_muon", True):
            for key, default_key in _AUX_DEFAULT_KEYS.items():
                param_group.setdefault(key, self.defaults[default_key])
            check_lr(param_group["lr"])
            _check_tensor_lr(param_group["lr"], param_group.get("foreach",
                                                               self.defaults["foreach"]))
            check_betas(param_group["betas"])
            check_eps(param_group["eps"])
            check_non_negative("weight_decay", param_group["weight_decay"])
        else:
            merged = {**self.defaults, **param_group}
            self._check_muon_hyper(merged)
            if "ns_dtype" in param_group:
                param_group["ns_dtype"] = merged["ns_dtype"]
            for p in tensors:
                if p.ndim < 2:
                    raise ValueError(
                        f"Muon: a parameter of shape {tuple(p.shape)} is in a use_muon=True "
                        "group, but Muon orthogonalises matrices (>= 2-D). Put 0/1-D tensors, "
                        "embeddings and the output head in a group with use_muon=False (AdamW), "
                        "e.g. Muon(muon_param_groups(model))."
                    )
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        self._update(self.param_groups)
        return loss

    def _update(self, groups: list[dict]) -> None:
        """One Muon/AdamW update of ``groups`` (a subset of ``self.param_groups``)."""
        pending: list[tuple[dict, Tensor, Tensor]] = []
        for group in groups:
            if group["use_muon"]:
                pending.extend(self._muon_directions(group))
            else:
                self._adamw_update(group)
        self._apply_orthogonalised(pending)

    def _muon_directions(self, group: dict) -> list[tuple[dict, Tensor, Tensor]]:
        params, grads, foreach = group_gradients("Muon", group)
        if not params:
            return []
        beta = group["momentum"]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        if foreach:
            torch._foreach_lerp_(bufs, grads, 1.0 - beta)
            updates = list(torch._foreach_lerp(grads, bufs, beta)) if group["nesterov"] else bufs
        else:
            for m, g in zip(bufs, grads):
                m.lerp_(g, 1.0 - beta)
            updates = [g.lerp(m, beta) for g, m in zip(grads, bufs)] if group["nesterov"] else bufs
        return [(group, p, u) for p, u in zip(params, updates)]

    @staticmethod
    def _apply_orthogonalised(pending: list[tuple[dict, Tensor, Tensor]]) -> None:
        buckets: dict[tuple, list[tuple[dict, Tensor, Tensor]]] = {}
        for group, p, u in pending:
            matrix = _as_matrix(u)
            key = (tuple(matrix.shape), matrix.dtype, matrix.device, group["ns_steps"],
                   group["ns_dtype"], id(p) if not _batchable(matrix) else None)
            buckets.setdefault(key, []).append((group, p, matrix))
        for (shape, _, _, ns_steps, ns_dtype, _), items in buckets.items():
            stacked = items[0][2] if len(items) == 1 else torch.stack([m for _, _, m in items])
            ortho = newton_schulz5(stacked, ns_steps, dtype=ns_dtype)
            ortho = ortho * muon_scale(*shape)
            if len(items) == 1:
                ortho = ortho.unsqueeze(0)
            for (group, p, _), o in zip(items, ortho):
                lr, wd = scalar_lr(group["lr"]), group["weight_decay"]
                if wd != 0:
                    p.mul_(1.0 - lr * wd)
                p.add_(o.reshape(p.shape), alpha=-lr)

    def _adamw_update(self, group: dict) -> None:
        """torch's own AdamW (functional ``torch.optim.adamw.adamw``) on the group's params."""
        params, grads, foreach = group_gradients("Muon", group, negate=False)
        if not params:
            return
        for p in params:
            init_adam_state(self.state[p], p)
            step_counter(self.state[p], p)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
              [], [s["step"] for s in states], foreach=foreach, amsgrad=False, beta1=beta1,
              beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
              eps=group["eps"], maximize=group["maximize"])


def _check_tensor_lr(lr: float | Tensor, foreach: bool | None) -> None:
    """torch's rule: a Tensor lr is refused with ``foreach=True`` (and ``capturable=False``)."""
    if isinstance(lr, Tensor) and foreach:
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")


# ---------------------------------------------------------------------- param split
def muon_param_groups(
    model: nn.Module,
    *,
    head: str | nn.Module | None = "auto",
    first_conv: bool = True,
    adamw: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a Muon group and an AdamW group.

    AdamW (``use_muon=False``): every 0-/1-D tensor, every ``nn.Embedding`` /
    ``nn.EmbeddingBag``, the output head, the first convolution (when ``first_conv``), and any
    parameter or module named in ``adamw``. Muon (``use_muon=True``): all other ≥2-D tensors
    (hidden linear and conv weights). Shared (tied) parameters appear once; tied to an
    embedding or the head, they go to AdamW.

    Args:
        model: the network.
        head: ``"auto"`` (the last ``nn.Linear`` in module order), a submodule name, a
            module, or ``None`` (no head).
        first_conv: put the first convolution (in module order) in the AdamW group.
        adamw: extra parameter or module names (as in ``named_parameters`` /
            ``named_modules``) forced into the AdamW group.

    Returns:
        ``[{"params": [...], "use_muon": True}, {"params": [...], "use_muon": False}]``
        (empty groups omitted); hyperparameters come from :class:`Muon`'s arguments unless
        you add them to the dicts.
    """
    modules = dict(model.named_modules())
    aux_modules: list[nn.Module] = [
        m for m in modules.values() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
    ]
    if head == "auto":
        linears = [m for m in modules.values() if isinstance(m, nn.Linear)]
        aux_modules += linears[-1:]
    elif isinstance(head, str):
        aux_modules.append(model.get_submodule(head))
    elif isinstance(head, nn.Module):
        aux_modules.append(head)
    elif head is not None:
        raise ValueError(f"Invalid head value: {head!r} (use 'auto', a module name, a module "
                         "or None)")
    if first_conv:
        convs = [m for m in modules.values() if isinstance(m, nn.modules.conv._ConvNd)]
        aux_modules += convs[:1]
    named_params = dict(model.named_parameters())
    aux_ids = {id(p) for m in aux_modules for p in m.parameters()}
    for name in adamw:
        if name in named_params:
            aux_ids.add(id(named_params[name]))
        elif name in modules:
            aux_ids.update(id(p) for p in modules[name].parameters())
        else:
            raise ValueError(f"Invalid adamw entry: {name!r} is neither a parameter nor a "
                             "module name of the model")
    muon, aux = [], []
    for p in named_params.values():
        if not p.requires_grad:
            continue
        (aux if id(p) in aux_ids or p.ndim < 2 else muon).append(p)
    groups = [{"params": muon, "use_muon": True}, {"params": aux, "use_muon": False}]
    return [g for g in groups if g["params"]]
