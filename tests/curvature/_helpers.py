"""Dense float64 oracles written from the definitions (never calling gradkit.curvature)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev


def flat_params(model: nn.Module, names: list[str] | None = None) -> tuple[list[str], Tensor]:
    named = dict(model.named_parameters())
    names = list(named) if names is None else names
    return names, torch.cat([named[n].detach().reshape(-1) for n in names])


def _unflatten(model: nn.Module, names: list[str], flat: Tensor) -> dict[str, Tensor]:
    named = dict(model.named_parameters())
    out, i = {}, 0
    for n in names:
        k = named[n].numel()
        out[n] = flat[i:i + k].reshape(named[n].shape)
        i += k
    return out


def outputs_of(model: nn.Module, names: list[str], X: Tensor):
    def f(flat: Tensor) -> Tensor:
        return functional_call(model, _unflatten(model, names, flat), (X,))
    return f


def dense_hessian(model, loss_fn, X, y, names=None) -> Tensor:
    names, theta = flat_params(model, names)
    f = outputs_of(model, names, X)
    return hessian(lambda t: loss_fn(f(t), y))(theta)


def dense_ggn(model, loss_fn, X, y, names=None) -> Tensor:
    """J^T H_out J with J the Jacobian of all outputs and H_out the Hessian in the outputs."""
    names, theta = flat_params(model, names)
    f = outputs_of(model, names, X)
    out = f(theta)
    J = jacrev(f)(theta).reshape(out.numel(), -1)
    H_out = hessian(lambda o: loss_fn(o.reshape(out.shape), y))(out.reshape(-1))
    return J.T @ H_out @ J


def dense_grad(model, loss_fn, X, y, theta: Tensor, names=None) -> Tensor:
    names = names or [n for n, _ in model.named_parameters()]
    t = theta.detach().clone().requires_grad_()
    loss = loss_fn(outputs_of(model, names, X)(t), y)
    return torch.autograd.grad(loss, t)[0]


def per_example_grad_matrix(model, loss_fn, X, y) -> Tensor:
    """(N, n) rows g_i = grad of example i's own loss, by a Python loop."""
    names, theta = flat_params(model)
    return torch.stack([dense_grad(model, loss_fn, X[i:i + 1], y[i:i + 1], theta, names)
                        for i in range(X.shape[0])])


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def with_spectrum(eigenvalues, seed: int = 0) -> Tensor:
    """Q diag(eigenvalues) Q^T with a random orthogonal Q (non-diagonal)."""
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(lam.shape[0], lam.shape[0], generator=gen(seed),
                                       dtype=torch.float64))
    return Q @ torch.diag(lam) @ Q.T
