r"""Byzantine attacks for evaluating robust aggregators (ByzFL's names and semantics).

An :class:`Attack` maps the honest workers' vectors (an (h, d) tensor) to the one vector
that every Byzantine worker sends (ByzFL's ``ByzantineClient`` replicates it f times)::

    v = ALittleIsEnough(tau=1.5)(H)                    # (d,)
    X = SignFlipping().corrupt(X, byzantine=[3, 4])    # rows 3, 4 replaced, computed from
                                                       # the other rows

The call takes two optional keywords that the simulator and the runtimes pass: ``f`` (the
number of Byzantine workers; used by ``ALittleIsEnough(tau="alie")``) and ``generator``
(a ``torch.Generator`` for the attacks that draw random numbers, for reproducibility).

Differences from ByzFL, on purpose: the dtype and device of the input are kept (ByzFL casts
to float32, ``Inf`` returns float64 and ``Gaussian`` draws on the CPU); randomness comes from
the given generator when there is one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gradkit.distributed import _validation as V

__all__ = [
    "ATTACKS",
    "ALittleIsEnough",
    "Attack",
    "Gaussian",
    "Inf",
    "InnerProductManipulation",
    "LabelFlipping",
    "Mimic",
    "SignFlipping",
    "alie_z_max",
]


class Attack:
    """Base class: ``attack(H, *, f=None, generator=None)`` → the Byzantine vector (d,)."""

    #: True for attacks that must be fed gradients computed on flipped labels
    needs_flipped_labels = False

    @property
    def name(self) -> str:
        return type(self).__name__

    def _params(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self._params().items())})"

    def __call__(self, honest: Any, *, f: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        H = V.as_matrix(self.name, honest)
        V.check_finite(self.name, H)
        return self.vector(H, f=f, generator=generator)

    def vector(self, H: Tensor, *, f: int | None, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def corrupt(self, X: Any, byzantine: Sequence[int], *,
                generator: torch.Generator | None = None) -> Tensor:
        """A copy of X whose ``byzantine`` rows hold the attack computed from the other rows."""
        X = V.as_matrix(self.name, X)
        byz = V.check_indices(self.name, "byzantine", list(byzantine), X.shape[0])
        if len(byz) >= X.shape[0]:
            raise ValueError(f"{self.name}: every row is Byzantine; at least one honest row "
                             "is needed to compute the attack")
        keep = torch.ones(X.shape[0], dtype=torch.bool, device=X.device)
        keep[byz] = False
        out = X.clone()
        if byz:
            out[byz] = self(X[keep], f=len(byz), generator=generator)
        return out


class SignFlipping(Attack):
    r"""Send :math:`-\bar h` (the negated honest mean)."""

    def vector(self, H, *, f, generator):
        return -H.mean(dim=0)


class InnerProductManipulation(Attack):
    r"""Send :math:`-\tau \bar h` (Xie et al., 2020, call τ "ε"). Args: ``tau`` (2.0)."""

    def __init__(self, tau: float = 2.0):
        self.tau = V.check_real(self.name, "tau", tau)

    def _params(self):
        return {"tau": self.tau}

    def vector(self, H, *, f, generator):
        return H.mean(dim=0) * -self.tau


def alie_z_max(n: int, f: int) -> float:
    r"""ALIE's factor (Baruch et al., 2019): :math:`s = \lfloor n/2 + 1\rfloor - f`,
    :math:`z_{max} = \Phi^{-1}((n - s)/n)`."""
    from statistics import NormalDist

    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if not 0 < p < 1:
        raise ValueError(f"ALittleIsEnough: z_max is undefined for n={n}, f={f} "
                         f"((n - s)/n = {p}); pass a numeric tau")
    return NormalDist().inv_cdf(p)


class ALittleIsEnough(Attack):
    r"""Send :math:`\bar h + \tau\,\sigma` coordinate-wise, σ the standard deviation of the
    honest vectors with ddof = 1 (as ByzFL's code and tests; its docstring says 1/n).

    Args:
        tau: the factor (ByzFL's default 1.5), or ``"alie"`` for the paper's
            :func:`alie_z_max` ``(n, f)`` with n = h + f (needs ``f`` at call time). The
            plus sign is ByzFL's; the paper writes μ − z·σ (the same attack mirrored).
    """

    def __init__(self, tau: float | str = 1.5):
        if tau != "alie":
            tau = V.check_real(self.name, "tau", tau)
        self.tau = tau

    def _params(self):
        return {"tau": self.tau}

    def vector(self, H, *, f, generator):
        if H.shape[0] < 2:
            raise ValueError("ALittleIsEnough needs at least 2 honest vectors (the standard "
                             "deviation uses ddof=1)")
        tau = self.tau
        if tau == "alie":
            if f is None:
                raise ValueError('ALittleIsEnough(tau="alie") needs the number of Byzantine '
                                 "workers: call attack(H, f=...)")
            tau = alie_z_max(H.shape[0] + f, f)
        return H.mean(dim=0) + tau * H.std(dim=0, correction=1)


class Mimic(Attack):
    """Send a copy of honest vector number ``epsilon`` (a fixed index; the paper's heuristic
    choice of whom to mimic is not implemented, as in ByzFL)."""

    def __init__(self, epsilon: int = 0):
        self.epsilon = V.check_count(self.name, "epsilon", epsilon)

    def _params(self):
        return {"epsilon": self.epsilon}

    def vector(self, H, *, f, generator):
        if not self.epsilon < H.shape[0]:
            raise ValueError(f"Mimic: epsilon={self.epsilon} must be smaller than the number "
                             f"of honest vectors ({H.shape[0]})")
        return H[self.epsilon].clone()


class Gaussian(Attack):
    r"""Send a draw of :math:`\mathcal N(\mu, \sigma^2)^d` (on the honest vectors' device,
    in their dtype; from ``generator`` when given). Args: ``mu`` (0.0), ``sigma`` (1.0)."""

    def __init__(self, mu: float = 0.0, sigma: float = 1.0):
        self.mu = V.check_real(self.name, "mu", mu)
        self.sigma = V.check_real(self.name, "sigma", sigma, nonnegative=True)

    def _params(self):
        return {"mu": self.mu, "sigma": self.sigma}

    def vector(self, H, *, f, generator):
        d = H.shape[1]
        if generator is not None:  # draw on the generator's device, then move
            z = torch.randn(d, generator=generator, dtype=H.dtype, device=generator.device)
            z = z.to(H.device)
        else:
            z = torch.randn(d, dtype=H.dtype, device=H.device)
        return z * self.sigma + self.mu


class Inf(Attack):
    """Send a vector of +inf (in the honest dtype; ByzFL's torch path returns float64).

    Every aggregator refuses non-finite rows unless composed after ``DropNonFinite()``.
    """

    def vector(self, H, *, f, generator):
        return torch.full_like(H[0], math.inf)


class LabelFlipping(Attack):
    """Send the mean of the vectors it is given, which must be gradients computed on flipped
    labels y' = (C − 1) − y. The simulator computes them from the honest workers' data
    (``needs_flipped_labels``); C is inferred from the data or set by ``num_classes``.

    ByzFL's clients compute these gradients with the model in eval mode; the simulator uses
    the model's training mode (the same for models without dropout or batch norm).
    """

    needs_flipped_labels = True

    def __init__(self, num_classes: int | None = None):
        if num_classes is not None:
            V.check_count(self.name, "num_classes", num_classes, minimum=2)
        self.flip_labels_to = num_classes

    def _params(self):
        return {"num_classes": self.flip_labels_to} if self.flip_labels_to else {}

    def vector(self, H, *, f, generator):
        return H.mean(dim=0)


#: the attacks by short name (for grids and command lines)
ATTACKS: dict[str, type[Attack]] = {
    "sign_flipping": SignFlipping,
    "ipm": InnerProductManipulation,
    "alie": ALittleIsEnough,
    "mimic": Mimic,
    "gaussian": Gaussian,
    "inf": Inf,
    "label_flipping": LabelFlipping,
}
