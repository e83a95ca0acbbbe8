"""SAM (sharpness-aware minimisation) and its adaptive variant ASAM, as a closure wrapper."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradkit._checks import check_non_negative
from gradkit.optim._base import params_with_grad
from gradkit.optim._registry import register
from gradkit.optim._wrapper import WrapperOptimizer, build_base


@register("sam")
class SAM(WrapperOptimizer):
    r"""Sharpness-aware minimisation around any base optimizer (needs a closure).

    .. math::
        \begin{aligned}
            &g \leftarrow \nabla L(w) \qquad (\text{first closure call})\\
            &e \leftarrow \rho\, \frac{T^2 g}{\lVert T g \rVert + 10^{-12}}, \qquad
                T = \mathrm{diag}(|w|) \text{ if adaptive else } I
                \quad (\text{norm over all parameters})\\
            &g_{\mathrm{SAM}} \leftarrow \nabla L(w + e) \qquad (\text{second closure call})\\
            &w \leftarrow \text{base step from } w \text{ with gradient } g_{\mathrm{SAM}}
        \end{aligned}

    Papers: P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur, "Sharpness-Aware Minimization for
    Efficiently Improving Generalization" (ICLR 2021); adaptive: J. Kwon et al., "ASAM"
    (ICML 2021). Reference matched: ``davda54/sam`` (global norm across all groups, ``rho``
    and ``adaptive`` per group, ``1e-12`` guard; ``w`` is restored exactly from a copy before
    the base step).

    ``step(closure)`` calls the closure twice; the closure must compute the loss and call
    ``backward()`` and return the loss. Gradients are reset (``set_to_none``) before each
    call, so the closure does not need ``zero_grad()``. ``step`` returns the loss at ``w``;
    afterwards ``p.grad`` holds the gradient at ``w + e`` (the one the base step used).
    With a base using ``maximize=True`` the perturbation is ``−e`` (the worst case for a
    maximised objective), so it mirrors minimising the negated loss. For manual control
    (e.g. mixed precision), use :meth:`first_step` / :meth:`second_step`
    around your own backward passes::

        opt = SAM(model.parameters(), base="sgd", rho=0.05, lr=0.1, momentum=0.9)
        def closure():
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        loss = opt.step(closure)

    The reference README's loop works unchanged (``base`` may be a class, as there)::

        opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

    (Choice: the reference's ``step(closure)`` expects the gradient at ``w`` to be computed
    before the call and evaluates the closure once; here ``step(closure)`` evaluates it
    twice, so no backward pass is needed before it.)

    Example (``w = 3``, ``L = w²``: ``e = ρ·sign(g) = 0.5``, gradient 7 at ``w + e``)::

        >>> import torch
        >>> from gradkit.optim import SAM
        >>> w = torch.nn.Parameter(torch.tensor([3.0]))
        >>> opt = SAM([w], base="sgd", lr=0.1, rho=0.5)
        >>> def closure():
        ...     loss = (w ** 2).sum()
        ...     loss.backward()
        ...     return loss
        >>> opt.step(closure).item()  # the loss at w
        9.0
        >>> w.detach(), w.grad  # w <- 3 - 0.1 * 7
        (tensor([2.3000]), tensor([7.]))

    Args:
        params: iterable of parameters or named_parameters to optimize, or dicts defining
            parameter groups; None when ``base`` is an optimizer instance.
        base: the base optimizer: a registry name, an optimizer class, or an instance
            (default: "sgd").
        rho: neighbourhood radius :math:`\rho`, per group (default: 0.05).
        adaptive: ASAM, scale the perturbation by :math:`|w|` (default: False).
        **base_kwargs: arguments of the base optimizer (``lr``, ``momentum``, ``maximize``,
            ``foreach``, ...).
    """

    def __init__(self, params: Any = None, base: Any = "sgd", *, rho: float = 0.05,
                 adaptive: bool = False, **base_kwargs: Any) -> None:
        check_non_negative("rho", rho)
        inner = build_base(params, base, base_kwargs, "SAM")
        super().__init__(inner, {"rho": rho, "adaptive": adaptive})
        self._perturbation: list[tuple[Tensor, Tensor]] = []

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to ``w + e`` using the current gradients (computed at ``w``).

        Args:
            zero_grad: then clear the gradients (``zero_grad()``, set to None), ready for
                the backward pass at ``w + e`` (the reference README's loop).
        """
        pairs = [(group, params_with_grad("SAM", group)) for group in self.param_groups]
        scaled = [g * p.abs() if group["adaptive"] else g
                  for group, (params, grads) in pairs for p, g in zip(params, grads)]
        if not scaled:
            if zero_grad:
                self.zero_grad()
            return
        device = scaled[0].device
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(t).to(device) for t in scaled]))
        self._perturbation = []
        for group, (params, grads) in pairs:
            # the base maximises: the adversarial point then lowers the objective
            sign = -1.0 if group.get("maximize", False) else 1.0
            scale = sign * group["rho"] / (norm + 1e-12)
            for p, g in zip(params, grads):
                e = (g * p.square() if group["adaptive"] else g) * scale.to(p.device)
                self._perturbation.append((p, p.clone()))
                p.add_(e)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return to ``w`` and take the base step with the current gradients (at ``w + e``).

        Args:
            zero_grad: then clear the gradients (``zero_grad()``, set to None).
        """
        for p, w in self._perturbation:
            p.copy_(w)
        self._perturbation = []
        self.base.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        if closure is None:
            raise RuntimeError(
                "SAM requires a closure: step(closure) where closure() computes the loss, calls "
                "loss.backward() and returns the loss (it is evaluated at w and at w + e); or "
                "call first_step() / second_step() around your own backward passes"
            )
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
        self.first_step()
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            closure()
        self.second_step()
        return loss
