"""MeZO (Malladi et al., 2023): zeroth-order SGD with SPSA gradient estimates, in place and
at inference memory -- the random directions are regenerated from a seed, never stored.

As in ``torch/optim/adam.py``: a thin class and ``_single_tensor_mezo_*`` functions with the
equations. There is no ``torch._foreach_*`` path: it would draw the direction of every
parameter at once, i.e. hold a second copy of the model, which is what MeZO avoids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from gradkit._checks import check_lr, check_non_negative, check_positive, check_positive_int
from gradkit.optim._base import reject_sparse, require_shared
from gradkit.optim._registry import register

__all__ = ["MeZO", "perturbation_seeds"]

SEED_RANGE = 1_000_000_000  # seeds are drawn from [0, 1e9), as in the reference


def perturbation_seeds(seed: int, step: int, n: int) -> list[int]:
    """The ``n`` seeds of step ``step`` (1-based) of a MeZO run with base ``seed``: a CPU
    ``torch.Generator`` seeded with ``seed + step`` draws them from [0, 1e9)."""
    gen = torch.Generator().manual_seed(seed + step)
    return torch.randint(0, SEED_RANGE, (n,), generator=gen).tolist()


def direction_generators(params: list[Tensor], seed: int) -> dict[torch.device, torch.Generator]:
    """One generator per device of ``params``, each seeded with ``seed``: the direction
    :math:`z` is ``torch.randn(p.shape, generator=gens[p.device], dtype=p.dtype)`` for each
    ``p`` in order -- the same numbers every time the seed is replayed."""
    gens: dict[torch.device, torch.Generator] = {}
    for p in params:
        if p.device not in gens:
            gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
    return gens


class _Directions:
    """Draws :math:`z` for each tensor of ``params`` in order, into one scratch buffer per
    (device, dtype) sized for the largest tensor: the values of
    ``torch.randn(p.shape, generator=...)``, without a fresh allocation per tensor (freed
    per-tensor buffers fragment the CPU heap and inflate the resident memory). Passing the
    same ``scratch`` dict to every sweep keeps one buffer for the whole run."""

    def __init__(self, params: list[Tensor], seed: int,
                 scratch: dict[tuple[torch.device, torch.dtype], Tensor] | None = None) -> None:
        self.gens = direction_generators(params, seed)
        self.scratch = {} if scratch is None else scratch
        for p in params:
            key = (p.device, p.dtype)
            if key not in self.scratch or self.scratch[key].numel() < p.numel():
                self.scratch[key] = torch.empty(p.numel(), dtype=p.dtype, device=p.device)

    def __call__(self, param: Tensor) -> Tensor:
        out = self.scratch[(param.device, param.dtype)][: param.numel()].view(param.shape)
        return torch.randn(param.shape, generator=self.gens[param.device], out=out)

    def get_state(self) -> dict[torch.device, Tensor]:
        """The generators' position (to draw the same tensors again: :meth:`set_state`)."""
        return {device: gen.get_state() for device, gen in self.gens.items()}

    def set_state(self, state: dict[torch.device, Tensor]) -> None:
        for device, gen in self.gens.items():
            gen.set_state(state[device])


def _single_tensor_mezo_perturb(params: list[Tensor], draw: _Directions, scale: float) -> None:
    r""":math:`\theta \leftarrow \theta + \text{scale} \cdot z`, with :math:`z` drawn by
    ``draw`` (:class:`_Directions`, from a seed), one tensor of :math:`z` at a time."""
    for param in params:
        param.add_(draw(param), alpha=scale)


def _single_tensor_mezo_update(params: list[Tensor], draw: _Directions, coefficient: float,
                               *, lrs: list[float], weight_decays: list[float]) -> None:
    r""":math:`\theta \leftarrow \theta - \gamma (c \, z + \omega \theta)` per tensor, with
    its group's :math:`\gamma` and :math:`\omega` (the decay term only where
    :math:`\omega \ne 0`), :math:`z` drawn by ``draw``."""
    for param, lr, weight_decay in zip(params, lrs, weight_decays):
        z = draw(param)
        if weight_decay != 0:
            param.sub_(z.mul_(coefficient).add_(param, alpha=weight_decay), alpha=lr)
        else:
            param.add_(z, alpha=-lr * coefficient)


def _call(closure: Callable[[], object]) -> float:
    """``closure()``'s loss as a float; a closure that calls ``backward`` gets an error
    saying why that cannot work here."""
    try:
        loss = closure()
    except RuntimeError as err:
        if "does not require grad" not in str(err):
            raise
        raise RuntimeError(
            "zeroth-order optimizers call the closure under torch.no_grad(): it must return "
            "the loss without calling backward() (e.g. lambda: loss_fn(model(x), y))"
        ) from err
    return _loss_value(loss)


def _loss_value(loss: object) -> float:
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise TypeError(f"MeZO's closure must return a scalar loss, got a tensor of shape "
                            f"{tuple(loss.shape)}")
        return float(loss.item())
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    raise TypeError(
        "MeZO.step needs a closure that returns the loss (a scalar tensor or float), got "
        f"{type(loss).__name__}: e.g. step(lambda: loss_fn(model(x), y)); the closure runs "
        "under torch.no_grad() and must not call backward()")


@register("mezo")
class MeZO(torch.optim.Optimizer):
    r"""MeZO: memory-efficient zeroth-order SGD (SPSA estimates with in-place perturbations).

    .. math::
        \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)}, \epsilon \text{ (eps)}, \omega
                \text{ (weight decay)}, n \text{ (n\_perturbations)}, f \text{ (closure)} \\
            &\textbf{for } t = 1, 2, \ldots \textbf{ do} \\
            &\hspace{5mm} \textbf{for } i = 1, \ldots, n: \
                s_i \leftarrow \text{seed}, \ z_i \sim \mathcal{N}(0, I)
                \text{ drawn from } s_i \text{ (regenerated, never stored)} \\
            &\hspace{10mm} \theta \leftarrow \theta + \epsilon z_i, \quad
                \ell^+_i \leftarrow f(\theta) \\
            &\hspace{10mm} \theta \leftarrow \theta - 2\epsilon z_i, \quad
                \ell^-_i \leftarrow f(\theta) \\
            &\hspace{10mm} \theta \leftarrow \theta + \epsilon z_i, \quad
                d_i \leftarrow (\ell^+_i - \ell^-_i) / (2\epsilon) \\
            &\hspace{5mm} \theta \leftarrow \theta - \gamma \big(\tfrac{d_1}{n} z_1
                + \omega \theta\big), \quad
                \theta \leftarrow \theta - \gamma \tfrac{d_i}{n} z_i \ (i = 2..n)
        \end{aligned}

    :math:`d_i z_i` is an unbiased estimate of the gradient of the Gaussian-smoothed loss
    (:math:`E[d\,z] = \nabla f` for a linear or quadratic :math:`f`). Memory is that of
    inference: no gradients, no activations kept for backward, one tensor of :math:`z`
    at a time.

    Use: ``loss = opt.step(lambda: loss_fn(model(x), y))``. The closure is called
    :math:`2n` times under ``torch.no_grad()`` (it must not call ``backward``) and must be
    deterministic -- the same parameters must give the same loss, so call ``model.eval()``
    (dropout in train mode draws a new mask per call and the difference
    :math:`\ell^+ - \ell^-` is then mostly dropout noise). The first step checks this
    (one extra closure call) and raises ``RuntimeError`` if two calls at the same
    parameters disagree; ``check_determinism=False`` turns the check off.

    Args:
        params: iterable of parameters or dicts defining parameter groups (all of them are
            perturbed together, in order; ``lr`` and ``weight_decay`` may differ per group,
            e.g. no decay on biases and norms as the reference does).
        lr: learning rate :math:`\gamma` (default: 1e-3).
        eps: perturbation scale :math:`\epsilon > 0` (default: 1e-3, the reference's
            ``zo_eps``); shared by all groups.
        weight_decay: :math:`\omega`, added to the estimated gradient (default: 0).
        n_perturbations: :math:`n \ge 1` SPSA estimates averaged per step (default: 1).
        seed: base seed of the perturbation seeds (default: None, drawn from torch's default
            generator, so ``torch.manual_seed`` makes runs reproducible). The seeds of step
            :math:`t` are :func:`perturbation_seeds` ``(seed, t, n)``.
        check_determinism: evaluate the closure a second time at the first step and refuse
            a closure that returns a different loss for the same parameters (default: True).

    Paper: S. Malladi et al., "Fine-Tuning Language Models with Just Forward Passes",
    NeurIPS 2023. Matches ``zo_perturb_parameters`` / ``zo_forward`` / ``zo_step`` /
    ``zo_update`` of princeton-nlp/MeZO ``large_models/trainer.py``: the +ε, −2ε, +ε
    in-place sequence, :math:`d = (\ell^+ - \ell^-)/(2\epsilon)`, the update
    :math:`\theta - \gamma(d z + \omega\theta)` with :math:`z` regenerated from the seed, and
    :math:`\ell^+` reported as the step's loss (here the mean of the :math:`\ell^+_i`).

    Choices: the reference reseeds torch's global generator (``torch.manual_seed``), which
    also resets the randomness of everything else in the program; gradkit draws :math:`z`
    from its own ``torch.Generator`` per device, seeded per perturbation, and leaves the
    global generator alone. Per-step seeds derive from one base seed (saved in
    ``state_dict`` with the step count), so a resumed run draws the same directions. The
    reference's :math:`n = 1`; for :math:`n > 1` (the paper's variant) the :math:`n`
    estimates are averaged, each direction restored before the next is drawn. Weight decay
    follows the param groups instead of the reference's name filter (bias / layer norm).
    The ±ε restore is exact only up to rounding (exact in float64 to ~1e-16 relative;
    float16 drifts).
    State: ``step`` in the first parameter's state; no per-parameter tensors.

    Example (quadratic :math:`f = \frac12\lVert\theta\rVert^2`: the estimate is exact,
    :math:`d = \theta^\top z`)::

        >>> import torch
        >>> from gradkit.optim import MeZO
        >>> from gradkit.optim.mezo import perturbation_seeds
        >>> theta = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
        >>> opt = MeZO([theta], lr=0.1, eps=1e-3, seed=0)
        >>> loss = opt.step(lambda: 0.5 * (theta ** 2).sum())
        >>> d = opt.state[theta]["projected_grads"].item()
        >>> gen = torch.Generator().manual_seed(perturbation_seeds(0, 1, 1)[0])
        >>> z = torch.randn(4, generator=gen, dtype=torch.float64)
        >>> print(abs(d - z.sum().item()) < 1e-9)  # d = θᵀz with θ = 1
        True
    """

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3, eps: float = 1e-3,
                 weight_decay: float = 0.0, n_perturbations: int = 1, *,
                 seed: int | None = None, check_determinism: bool = True) -> None:
        check_lr(lr)
        check_positive("eps", eps)
        check_non_negative("weight_decay", weight_decay)
        check_positive_int("n_perturbations", n_perturbations)
        if seed is None:
            seed = int(torch.randint(0, SEED_RANGE, ()).item())
        elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"Invalid seed value: {seed!r} (must be a non-negative integer)")
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay,
                        n_perturbations=n_perturbations, seed=seed,
                        check_determinism=check_determinism)
        super().__init__(params, defaults)
        require_shared(self, ("eps", "n_perturbations", "seed"),
                       "shared by all parameter groups: they are perturbed together")
        # one buffer per (device, dtype) for z, the size of the largest tensor (not state)
        self._scratch: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def _params(self) -> list[Tensor]:
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        for p in params:
            if p.grad is not None:
                reject_sparse("MeZO", p.grad)
        return params

    @torch.no_grad()
    def step(self, closure: Callable[[], object] | None = None) -> float:  # type: ignore[override]
        """One MeZO step; ``closure`` returns the loss at the current parameters (required).

        Returns the mean loss at the + perturbations, :math:`\\frac1n\\sum_i \\ell^+_i`.
        """
        if closure is None:
            _loss_value(None)
        params = self._params()
        group0 = self.param_groups[0]
        eps, n = group0["eps"], group0["n_perturbations"]
        state = self.state[params[0]]
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        step = int(state["step"].item()) + 1
        seeds = perturbation_seeds(group0["seed"], step, n)
        projected, losses_plus = [], []
        for i, s in enumerate(seeds):
            check = step == 1 and i == 0 and group0["check_determinism"]
            loss_plus, loss_minus = self._two_point(params, s, eps, closure, check)
            projected.append(self._projected((loss_plus - loss_minus) / (2 * eps)))
            losses_plus.append(loss_plus)
        lrs = [float(g["lr"]) for g in self.param_groups for p in g["params"]
               if p.requires_grad]
        decays = [g["weight_decay"] for g in self.param_groups for p in g["params"]
                  if p.requires_grad]
        for i, s in enumerate(seeds):
            _single_tensor_mezo_update(params, self._draw(params, s), projected[i] / n, lrs=lrs,
                                       weight_decays=decays if i == 0 else [0.0] * len(params))
        state["step"] += 1
        state["projected_grads"] = torch.tensor(projected, dtype=torch.float64)
        return sum(losses_plus) / n

    def _projected(self, estimate: float) -> float:
        """The scalar :math:`d` the update uses (QZO clips it)."""
        return estimate

    def _draw(self, params: list[Tensor], seed: int) -> _Directions:
        return _Directions(params, seed, self._scratch)

    def _two_point(self, params: list[Tensor], seed: int, eps: float,
                   closure: Callable[[], object], check: bool) -> tuple[float, float]:
        r""":math:`(\ell^+, \ell^-)` at :math:`\theta \pm \epsilon z(\text{seed})`;
        :math:`\theta` is restored afterwards, also when the closure raises."""
        shift = 0.0  # θ currently equals θ_0 + shift·z
        try:
            _single_tensor_mezo_perturb(params, self._draw(params, seed), eps)
            shift = eps
            loss_plus = _call(closure)
            if check:
                again = _call(closure)
                if again != loss_plus:
                    raise RuntimeError(
                        "MeZO's closure is not deterministic: two calls at the same "
                        f"parameters returned {loss_plus!r} and {again!r}. The SPSA estimate "
                        "(L(θ+εz) - L(θ-εz)) / 2ε would then measure mostly that noise. "
                        "Common cause: dropout or other random layers in train mode; call "
                        "model.eval() (MeZO runs no backward, so train mode buys nothing), "
                        "or fix the randomness inside the closure; pass "
                        "check_determinism=False to skip this check.")
            _single_tensor_mezo_perturb(params, self._draw(params, seed), -2 * eps)
            shift = -eps
            loss_minus = _call(closure)
            _single_tensor_mezo_perturb(params, self._draw(params, seed), eps)
            shift = 0.0
        except BaseException:
            if shift:
                _single_tensor_mezo_perturb(params, self._draw(params, seed), -shift)
            raise
        return loss_plus, loss_minus
