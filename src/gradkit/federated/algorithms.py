r"""Client-side rules of the federated algorithms: the gradient each local step feeds to the
client's torch optimizer, and what the server adds to the aggregated update.

Every rule is written once as a pure function of one client's tensors
``fn(params, buffers, x, y, anchor, state) -> (grads, loss)`` (``anchor`` = the global
model w_t of the round, ``state`` = the client's server-held vectors); the simulator runs it
per client in a loop, or over many clients at once under ``torch.func.vmap``.

FedAvg (McMahan et al., 2017)
    g = ∇f_i(w; ξ).
FedProx (Li et al., MLSys 2020)
    g = ∇f_i(w; ξ) + μ (w − w_t), the gradient of f_i + (μ/2)‖w − w_t‖².
FedSpeed (Sun et al., ICLR 2023), as the authors' ``FL-Simulator`` (client/fedspeed.py,
server/FedSpeed.py, optimizer/ESAM.py) does it, with c = ``lamb`` (= 1/λ of the paper)::

    g1 = ∇f_i(w; ξ)
    ŵ  = w + ρ·g1/(‖g1‖ + 1e-7)                      (SAM ascent, same minibatch)
    g  = (1 − α)·g1 + α·∇f_i(ŵ; ξ)                   (α = 1 in the released code: plain SAM)
    u  = clip_{max_norm}( g + c·(h_i − w_t) )        (global-norm clipping, max 10)
    step with u + c·w                                 (torch SGD's weight decay wd + c)

  so prox and correction add up to c·(w − w_t + h_i), with h_i the client's running sum
  of its past updates (zero at first). The server keeps h_i for every client::

    Δ_i = w_{i,K} − w_t;   h_i ← h_i + Δ_i            (participants only)
    w_{t+1} = w_t + mean_{i∈S_t} Δ_i + mean_{all N clients} h_i

  Choices: the correction is averaged over all N clients (stale h of absent clients
  included, as the code does); the clipping covers the SAM gradient plus the correction
  but not c·w; in the first round h = 0, so the step is SAM-FedProx with coefficient c and
  one round with ρ = c = 0 gives w_1 = w_0 + 2Δ (the correction doubles the first step —
  that is the reference's behaviour, kept and tested). The clients' own weight decay wd
  belongs to their torch optimizer. The ``--use-RI`` variant is not implemented.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad, grad_and_value

from gradkit.distributed import _validation as V

__all__ = ["ALGORITHMS", "FedAvg", "FedProx", "FedSpeed"]


class FedAvg:
    """Plain local SGD steps on f_i; the server averages the updates (FedAvg)."""

    #: the per-client server-held vectors this rule needs (FedSpeed: h_i)
    needs_state = False

    def gradient_fn(self, loss):
        """``fn(params, buffers, x, y, anchor, state) -> (grads, loss)`` for ``loss``
        ``(params, buffers, x, y) -> scalar``."""
        def fn(params, buffers, x, y, anchor, state):
            return grad_and_value(loss)(params, buffers, x, y)
        return fn

    def init_state(self, n_clients: int, dim: int, like: Tensor) -> None:
        """Allocate server-held per-client state (none here)."""

    def client_state(self, clients: list[int]) -> Tensor | None:
        """(len(clients), d) state rows sent down with the model (None here)."""
        return None

    def end_round(self, clients: list[int], deltas: Tensor) -> Tensor | None:
        """Record the participants' updates; return a (d,) vector the server adds to the
        aggregated update, or None."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FedProx(FedAvg):
    """FedProx: local steps on f_i(w) + (μ/2)‖w − w_t‖².

    Args:
        mu: μ >= 0 (0 = FedAvg).
    """

    def __init__(self, mu: float = 0.01):
        self.mu = V.check_real("FedProx", "mu", mu, nonnegative=True)

    def gradient_fn(self, loss):
        mu = self.mu

        def fn(params, buffers, x, y, anchor, state):
            g, value = grad_and_value(loss)(params, buffers, x, y)
            return {k: g[k] + mu * (params[k] - anchor[k]) for k in g}, value
        return fn

    def __repr__(self) -> str:
        return f"FedProx(mu={self.mu})"


class FedSpeed(FedAvg):
    """FedSpeed: SAM-perturbed local gradients with a prox-correction term (module docstring).

    Args:
        rho: ρ >= 0, the SAM radius (reference default 0.1).
        lamb: c >= 0, the prox-correction coefficient (reference ``lamb``, default 0.1).
        alpha: α in [0, 1], weight of the perturbed gradient in the quasi-gradient
            (default 1.0 = the released code; the paper's value is not stated there).
        max_norm: the global-norm clip of the SAM gradient plus correction (default 10).
    """

    needs_state = True

    def __init__(self, rho: float = 0.1, lamb: float = 0.1, alpha: float = 1.0,
                 max_norm: float = 10.0):
        self.rho = V.check_real("FedSpeed", "rho", rho, nonnegative=True)
        self.lamb = V.check_real("FedSpeed", "lamb", lamb, nonnegative=True)
        self.alpha = V.check_real("FedSpeed", "alpha", alpha, nonnegative=True)
        if self.alpha > 1:
            raise ValueError(f"Invalid alpha value: {alpha} (FedSpeed needs alpha in [0, 1])")
        self.max_norm = V.check_real("FedSpeed", "max_norm", max_norm, positive=True)
        self.h: Tensor | None = None

    def gradient_fn(self, loss):
        rho, c, alpha, max_norm = self.rho, self.lamb, self.alpha, self.max_norm

        def fn(params, buffers, x, y, anchor, state):
            g1, value = grad_and_value(loss)(params, buffers, x, y)
            norm = torch.sqrt(sum((g * g).sum() for g in g1.values()))
            scale = rho / (norm + 1e-7)
            perturbed = {k: params[k] + scale * g1[k] for k in params}
            g = grad(loss)(perturbed, buffers, x, y)
            if alpha != 1.0:
                g = {k: (1 - alpha) * g1[k] + alpha * g[k] for k in g}
            u = {k: g[k] + c * (state[k] - anchor[k]) for k in g}
            u_norm = torch.sqrt(sum((v * v).sum() for v in u.values()))
            clip = torch.clamp(max_norm / (u_norm + 1e-6), max=1.0)  # torch's clip_grad_norm_
            return {k: clip * u[k] + c * params[k] for k in u}, value
        return fn

    def init_state(self, n_clients: int, dim: int, like: Tensor) -> None:
        self.h = like.new_zeros((n_clients, dim))

    def client_state(self, clients: list[int]) -> Tensor:
        return self.h[clients]

    def end_round(self, clients: list[int], deltas: Tensor) -> Tensor:
        self.h[clients] += deltas
        return self.h.mean(dim=0)

    def __repr__(self) -> str:
        return (f"FedSpeed(rho={self.rho}, lamb={self.lamb}, alpha={self.alpha}, "
                f"max_norm={self.max_norm})")


ALGORITHMS = {"fedavg": FedAvg, "fedprox": FedProx, "fedspeed": FedSpeed}
