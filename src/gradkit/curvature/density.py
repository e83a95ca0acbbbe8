r"""Spectral density by stochastic Lanczos quadrature (SLQ).

Ghorbani, Krishnan & Xiao, "An Investigation into Neural Net Optimization via Hessian
Eigenvalue Density" (ICML 2019), and Lin, Saad & Yang, "Approximating spectral densities of
large matrices" (SIAM Review 2016). For each of ``n_runs`` Rademacher start vectors
:math:`v` (normalised), ``n_steps`` Lanczos steps with full reorthogonalization give a
tridiagonal :math:`T = U \operatorname{diag}(\theta) U^\top` (``torch.linalg.eigh``, never
``eig``); the Gauss quadrature nodes are :math:`\theta_i` with weights
:math:`w_i = U_{1i}^2` (first-row squares, summing to 1 per run — the PyHessian PR #23
fix), and

.. math::
    \phi(t) = \frac{1}{n_\mathrm{runs}} \sum_{r} \sum_i w^{(r)}_i\,
        \frac{1}{\sigma\sqrt{2\pi}} \exp\!\Big(-\frac{(t - \theta^{(r)}_i)^2}{2\sigma^2}\Big).

All runs advance together, so each Lanczos step is one block product of ``n_runs`` columns.
Outliers: Ritz values of the first run that have converged (Ritz residual
:math:`\beta_m |U_{mi}| \le` ``outlier_tol`` times the largest node magnitude) and lie outside
the bulk, defined as the connected part of the grid around the density's maximum where
:math:`\phi` is at least ``outlier_floor`` times the peak of a single eigenvalue,
:math:`1/(n\sigma\sqrt{2\pi})` (our choice: Papyan's outliers are separated from the bulk by
a gap; with the default 0.01, two eigenvalues further apart than about :math:`6.5\sigma` fall
in different components, so ``sigma`` sets the resolution).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gradkit.curvature._operator import LinearOperator
from gradkit.curvature._random import rademacher, resolve_generator


@dataclass
class SpectralDensity:
    """The result of :func:`spectral_density`."""

    grid: Tensor  # (n_grid,)
    density: Tensor  # (n_grid,), integrates to ~1 over the grid
    nodes: Tensor  # (n_runs, n_steps) Ritz values per run, ascending
    weights: Tensor  # (n_runs, n_steps) quadrature weights, each row sums to 1
    outliers: Tensor  # converged isolated Ritz values, descending
    num_matvecs: int
    sigma: float


def _orthogonalize(Q: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Remove from each run's ``w`` (r, n) its components on that run's basis ``Q`` (r, j, n),
    twice; also return the first pass's coefficients."""
    coef = torch.einsum("rjn,rn->rj", Q, w)
    w = w - torch.einsum("rj,rjn->rn", coef, Q)
    return w - torch.einsum("rj,rjn->rn", torch.einsum("rjn,rn->rj", Q, w), Q), coef


def _lanczos_tridiag(op: LinearOperator, V0: Tensor, n_steps: int,
                     gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Run ``V0.shape[1]`` independent Lanczos processes in lockstep.

    Returns the tridiagonals ``T`` (r, m, m) and the last residual norms ``beta_m`` (r,). On
    a breakdown (an invariant subspace: beta ~ 0) a run continues from a random vector
    orthogonal to its basis with a zero coupling, which adds nodes of weight zero.
    """
    n, r = V0.shape
    m = min(n_steps, n)
    Q = torch.zeros(r, m, n, dtype=V0.dtype, device=V0.device)
    T = torch.zeros(r, m, m, dtype=torch.float64)
    q = (V0 / V0.norm(dim=0)).T  # (r, n)
    beta = torch.zeros(r, dtype=V0.dtype, device=V0.device)
    scale = 0.0
    for j in range(m):
        Q[:, j] = q
        w = op.matmat(q.T).T
        scale = max(scale, float(w.norm(dim=1).max()))
        w, coef = _orthogonalize(Q[:, : j + 1], w)
        beta = w.norm(dim=1)
        T[:, j, j] = coef[:, j].to(torch.float64)
        if j + 1 == m:
            break
        broken = beta <= 1e3 * torch.finfo(w.dtype).eps * max(scale, 1e-300)
        if bool(broken.any()):
            fresh = rademacher((r, n), w.dtype, w.device, gen)
            fresh, _ = _orthogonalize(Q[:, : j + 1], fresh)
            w = torch.where(broken[:, None], fresh, w)
            beta = torch.where(broken, torch.zeros_like(beta), beta)
        T[:, j, j + 1] = T[:, j + 1, j] = beta.to(torch.float64)
        q = w / w.norm(dim=1, keepdim=True)
    return T, beta.to(torch.float64)


def _outliers(grid: Tensor, density: Tensor, nodes: Tensor, beta: Tensor, U: Tensor,
              tol: float, floor: float) -> Tensor:
    """Converged Ritz values of run 0 outside the bulk (see the module docstring)."""
    inside = density >= floor
    peak = int(density.argmax())
    gaps = torch.nonzero(~inside).flatten()
    left = gaps[gaps < peak]
    right = gaps[gaps > peak]
    lo = grid[int(left.max()) + 1] if left.numel() else -torch.inf
    hi = grid[int(right.min()) - 1] if right.numel() else torch.inf
    theta, resid = nodes[0], beta[0] * U[0, -1, :].abs()
    converged = resid <= tol * float(nodes.abs().max())
    outside = (theta > hi) | (theta < lo)
    return torch.sort(theta[converged & outside], descending=True).values


def spectral_density(
    op: LinearOperator,
    n_runs: int = 1,
    n_steps: int = 90,
    *,
    grid: Tensor | None = None,
    n_grid: int = 1000,
    sigma: float | None = None,
    outlier_tol: float = 1e-3,
    outlier_floor: float = 0.01,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SpectralDensity:
    """Gaussian-broadened SLQ density (module docstring).

    Args:
        op: the operator.
        n_runs: random start vectors (runs advance together as one block product).
        n_steps: Lanczos steps per run (``n_runs * n_steps`` products in all).
        grid: evaluation points; default ``n_grid`` points spanning the nodes +- 5 sigma.
        n_grid: number of default grid points.
        sigma: broadening; default 1% of the node range.
        outlier_tol: residual tolerance (relative to the largest node) of an outlier.
        outlier_floor: bulk threshold as a fraction of one eigenvalue's peak (module
            docstring).
        v0: start vectors ``(n, n_runs)`` (default: Rademacher from ``generator``).
        generator: source of the start vectors and of breakdown replacements.

    Returns:
        A :class:`SpectralDensity` (``grid``, ``density``, ``nodes``, ``weights``,
        ``outliers``, ``num_matvecs``, ``sigma``).

    Example::

        >>> import torch
        >>> from gradkit.curvature import MatrixOperator, spectral_density
        >>> lam = torch.cat([torch.linspace(0.0, 1.0, 200, dtype=torch.float64),
        ...                  torch.tensor([10.0], dtype=torch.float64)])
        >>> sd = spectral_density(MatrixOperator(torch.diag(lam)), n_runs=2, n_steps=30,
        ...                       generator=torch.Generator().manual_seed(0))
        >>> sd.outliers.round(decimals=6)  # the isolated eigenvalue
        tensor([10.], dtype=torch.float64)
        >>> round(float(torch.trapezoid(sd.density, sd.grid)), 2)  # a probability density
        1.0
    """
    if n_runs < 1 or n_steps < 1:
        raise ValueError(f"Invalid n_runs/n_steps: {n_runs}, {n_steps}")
    gen = resolve_generator(generator)
    if v0 is None:
        V0 = rademacher((op.shape[0], n_runs), op.dtype, op.device, gen)
    else:
        V0 = v0.reshape(op.shape[0], -1).to(dtype=op.dtype, device=op.device)
        if V0.shape[1] != n_runs:
            raise ValueError(f"v0 must have n_runs={n_runs} columns, got {V0.shape[1]}")
    T, beta = _lanczos_tridiag(op, V0, n_steps, gen)
    nodes, U = torch.linalg.eigh(T)
    weights = U[:, 0, :] ** 2
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = max(0.01 * (hi - lo), 1e-12 * max(abs(lo), abs(hi), 1.0))
    if not sigma > 0:
        raise ValueError(f"Invalid sigma: {sigma}")
    if grid is None:
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, n_grid, dtype=torch.float64)
    grid = grid.to(torch.float64)
    z = (grid[:, None, None] - nodes[None]) / sigma
    kernel = torch.exp(-0.5 * z**2) / (sigma * (2 * torch.pi) ** 0.5)
    density = (kernel * weights[None]).sum(dim=(1, 2)) / n_runs

    one_eigenvalue_peak = 1.0 / (op.shape[0] * sigma * (2 * torch.pi) ** 0.5)
    outliers = _outliers(grid, density, nodes, beta, U, outlier_tol,
                         outlier_floor * one_eigenvalue_peak)
    return SpectralDensity(grid, density, nodes, weights, outliers,
                           n_runs * T.shape[1], float(sigma))
