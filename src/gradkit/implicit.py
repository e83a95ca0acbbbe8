r"""Implicit differentiation of solvers: jaxopt's ``custom_root`` and ``custom_fixed_point``.

Blondel, Berthet, Cuturi, Frostig, Hoyer, Llinares-López, Pedregosa & Vert, *Efficient and
Modular Implicit Differentiation*, NeurIPS 2022 (arXiv 2105.15183); API as in jaxopt
(``jaxopt.implicit_diff.custom_root``) and torchopt (``torchopt.diff.implicit.custom_root``).

A solver returns :math:`x^\star(\theta)` with :math:`F(x^\star(\theta), \theta) = 0` for an
*optimality function* :math:`F` (for example the gradient :math:`\nabla_x f(x, \theta)` of an
inner objective). If :math:`A = \partial_1 F(x^\star, \theta)` is invertible, the implicit
function theorem gives

.. math::
    \frac{\partial x^\star}{\partial \theta} = -A^{-1} B, \qquad
    A = \partial_1 F(x^\star, \theta), \quad B = \partial_2 F(x^\star, \theta).

Reverse mode needs only vector-Jacobian products: for the cotangent :math:`v` of
:math:`x^\star`,

.. math::
    A^\top u = v, \qquad
    \bar\theta = v^\top \frac{\partial x^\star}{\partial \theta} = -B^\top u .

The linear system is solved matrix-free: :math:`u \mapsto A^\top u` is one VJP of
:math:`x \mapsto F(x, \theta)` (the graph of :math:`F` at :math:`x^\star` is built once per
backward and reused), and :math:`-B^\top u` is one VJP in :math:`\theta`. No iterate of the
solver is stored, and the solver runs without autograd (under :func:`torch.no_grad`, on
detached copies of :math:`\theta`), so it may be any PyTorch code, differentiable or not.
The hypergradient is exact only at a true root: the solver must be run to convergence.

Linear solvers (``solve=``), all built on :func:`gradkit.curvature.conjugate_gradient`:

* ``"normal_cg"`` (default, as in jaxopt and torchopt): CG on the normal equations
  :math:`(A A^\top + \rho I)\,u = A v`; works for any invertible :math:`A` (fixed points,
  non-symmetric conditions). :math:`A w` is obtained as the VJP of the linear map
  :math:`u \mapsto A^\top u` (double backward), so ``optimality_fn`` must be twice
  differentiable by autograd (all standard ops are).
* ``"cg"``: CG on :math:`(A^\top + \rho I)\,u = v`; requires :math:`A` symmetric positive
  definite, e.g. :math:`F = \nabla_x f` with :math:`f` strongly convex in :math:`x` (then
  :math:`A` is the Hessian) -- half the products of ``"normal_cg"``.
* a callable ``solve(matvec, b) -> u`` solving ``matvec(u) = b`` with ``matvec`` the map
  :math:`u \mapsto A^\top u` on flat vectors (jaxopt's convention for ``solve``).

``tol`` is CG's relative residual tolerance (of the system CG runs: for ``"normal_cg"`` the
normal equations), ``maxiter`` its iteration budget (default ``10 * n`` as in jaxopt and
torchopt, ``n`` the size of :math:`x`), ``ridge`` = :math:`\rho` a Tikhonov shift for a
singular or ill-conditioned :math:`A`. When the linear solve does not converge, an
:class:`ImplicitDiffWarning` reports the true residual :math:`\lVert A^\top u - v\rVert` and
the optimality residual :math:`\lVert F(x^\star, \theta)\rVert`; the gradient is still
returned.

Choices (differences from the anchors): every positional argument after ``init`` is
differentiated (jaxopt's behaviour; torchopt's ``argnums`` is not needed: a tensor that does
not require grad costs nothing); ``init`` never receives a gradient (as in both); the backward
is once differentiable (no hypergradient Hessians); arguments are passed positionally only.

Example (ridge regression, the paper's Figure 1)::

    >>> import torch
    >>> from gradkit.implicit import custom_root
    >>> X = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 7.0]], dtype=torch.float64)
    >>> y = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    >>> def optimality(w, lam):  # gradient of 0.5 ||X w - y||^2 + 0.5 lam ||w||^2
    ...     return X.T @ (X @ w - y) + lam * w
    >>> @custom_root(optimality, solve="cg", tol=1e-12)
    ... def ridge(init, lam):  # any solver; here the closed form
    ...     return torch.linalg.solve(X.T @ X + lam * torch.eye(2, dtype=X.dtype), X.T @ y)
    >>> lam = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    >>> w = ridge(None, lam)
    >>> (g,) = torch.autograd.grad(w.sum(), lam)
    >>> H = X.T @ X + lam.detach() * torch.eye(2, dtype=X.dtype)  # dw/dlam = -H^-1 w
    >>> torch.allclose(g, -torch.linalg.solve(H, w.detach()).sum())
    True
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from gradkit.curvature._operator import LinearOperator
from gradkit.curvature.cg import conjugate_gradient

__all__ = ["ImplicitDiffWarning", "custom_fixed_point", "custom_root", "hypergradient"]

Solution = Tensor | tuple[Tensor, ...]
LinearSolve = Literal["cg", "normal_cg"] | Callable[[Callable[[Tensor], Tensor], Tensor], Tensor]


class ImplicitDiffWarning(RuntimeWarning):
    """The linear system of implicit differentiation was not solved to the tolerance."""


class _FunctionOperator(LinearOperator):
    """A square operator known through a vector function (one product per column)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], n: int, dtype: torch.dtype, device):
        super().__init__(n, dtype, device)
        self.fn = fn

    def _matmat(self, V: Tensor) -> Tensor:
        return torch.stack([self.fn(V[:, j]) for j in range(V.shape[1])], dim=1)


def _as_tuple(x: Any, what: str) -> tuple[tuple[Tensor, ...], bool]:
    """``(tensors, was_a_tuple)``; a solution is a floating tensor or a tuple of them."""
    is_tuple = isinstance(x, (tuple, list))
    xs = tuple(x) if is_tuple else (x,)
    if not xs or not all(isinstance(t, Tensor) and t.is_floating_point() for t in xs):
        raise TypeError(
            f"{what} must return a floating-point tensor or a tuple of them, "
            f"got {type(x).__name__}"
        )
    return xs, is_tuple


def _flat(ts: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    return torch.cat(
        [(torch.zeros_like(r) if t is None else t).reshape(-1) for t, r in zip(ts, like)]
    )


def _unflat(v: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
    out, i = [], 0
    for r in like:
        out.append(v[i : i + r.numel()].view_as(r))
        i += r.numel()
    return tuple(out)


class _Config:
    def __init__(self, solver, optimality_fn, solve, tol, maxiter, ridge):
        self.solver = solver
        self.optimality_fn = optimality_fn
        self.solve = solve
        self.tol = tol
        self.maxiter = maxiter
        self.ridge = ridge
        self.is_tuple = False
        self.n_x = 0
        self.theta_is_tensor: tuple[bool, ...] = ()


def _solve_adjoint(cfg: _Config, Fs, xs_req, v: Tensor) -> Tensor:
    """``u`` with ``(A^T + ridge I) u = v`` (or its normal equations), warning if unsolved."""
    n = v.numel()

    def rmatvec(u: Tensor) -> Tensor:  # u -> A^T u, one VJP of F in x
        g = torch.autograd.grad(Fs, xs_req, _unflat(u, Fs), retain_graph=True, allow_unused=True)
        return _flat(g, xs_req)

    converged, iterations = True, None
    if cfg.solve == "cg":
        op = _FunctionOperator(rmatvec, n, v.dtype, v.device)
        maxiter = 10 * n if cfg.maxiter is None else cfg.maxiter
        u, info = conjugate_gradient(op, v, damping=cfg.ridge, tol=cfg.tol, maxiter=maxiter)
        converged, iterations = info.converged, info.iterations
    elif cfg.solve == "normal_cg":
        # A w as the VJP of the linear map u0 -> A^T u0 (its Jacobian in u0 is A^T).
        u0 = torch.zeros_like(v, requires_grad=True)
        g = torch.autograd.grad(
            Fs, xs_req, _unflat(u0, Fs), retain_graph=True, create_graph=True, allow_unused=True
        )
        At_u0 = _flat(g, xs_req)

        def matvec(w: Tensor) -> Tensor:  # w -> A w
            if not At_u0.requires_grad:  # F does not depend on x: A = 0
                return torch.zeros_like(w)
            return torch.autograd.grad(At_u0, u0, w, retain_graph=True)[0]

        op = _FunctionOperator(lambda w: matvec(rmatvec(w)), n, v.dtype, v.device)
        maxiter = 10 * n if cfg.maxiter is None else cfg.maxiter
        u, info = conjugate_gradient(op, matvec(v), damping=cfg.ridge, tol=cfg.tol, maxiter=maxiter)
        converged, iterations = info.converged, info.iterations
    else:
        u = cfg.solve(rmatvec, v)
        if not isinstance(u, Tensor) or u.shape != v.shape:
            raise ValueError(
                f"solve(matvec, b) must return a tensor of b's shape {tuple(v.shape)}, "
                f"got {tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__}"
            )
    residual = float((rmatvec(u) + cfg.ridge * u - v).norm())
    vnorm = float(v.norm())
    if iterations is None:  # a user solve: judge by the true residual
        converged = residual <= cfg.tol * vnorm
    if not converged or not math.isfinite(residual):
        fnorm = float(_flat(Fs, xs_req).detach().norm())
        what = f"in {iterations} iterations " if iterations is not None else ""
        warnings.warn(
            f"implicit differentiation: the linear solve (d optimality_fn / dx)^T u = v "
            f"(solve={cfg.solve!r}, tol={cfg.tol:g}) did not converge {what}: residual "
            f"||A^T u - v|| = {residual:.3e} (relative {residual / max(vnorm, 1e-300):.3e}); "
            f"the gradient may be inaccurate. Raise maxiter, add ridge, or check that the "
            f"solver reached a root (||optimality_fn(x*, theta)|| = {fnorm:.3e}).",
            ImplicitDiffWarning,
            stacklevel=4,
        )
    return u


class _ImplicitRoot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg: _Config, init, *theta):
        detached = tuple(t.detach() if isinstance(t, Tensor) else t for t in theta)
        xs, is_tuple = _as_tuple(cfg.solver(init, *detached), "the solver")
        xs = tuple(x.detach().clone() for x in xs)  # never alias an input
        ctx.cfg = cfg
        ctx.is_tuple = is_tuple
        ctx.n_x = len(xs)
        ctx.theta_is_tensor = tuple(isinstance(t, Tensor) for t in theta)
        ctx.theta_other = tuple(None if isinstance(t, Tensor) else t for t in theta)
        ctx.save_for_backward(*xs, *(t for t in theta if isinstance(t, Tensor)))
        return xs if is_tuple else xs[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        cfg = ctx.cfg
        saved = ctx.saved_tensors
        xs, theta_t = saved[: ctx.n_x], iter(saved[ctx.n_x :])
        wants = ctx.needs_input_grad[2:]
        v = _flat(grads, xs)
        with torch.enable_grad():
            xs_req = tuple(x.detach().requires_grad_() for x in xs)
            theta = []
            for is_t, other, want in zip(ctx.theta_is_tensor, ctx.theta_other, wants):
                if is_t:
                    t = next(theta_t).detach()
                    theta.append(t.requires_grad_() if want else t)
                else:
                    theta.append(other)
            F = cfg.optimality_fn(xs_req if ctx.is_tuple else xs_req[0], *theta)
            Fs, _ = _as_tuple(F, "optimality_fn")
            if len(Fs) != len(xs) or any(f.shape != x.shape for f, x in zip(Fs, xs)):
                raise ValueError(
                    "optimality_fn(x, *theta) must return a tensor (or tuple of tensors) of "
                    f"the solution's shape {[tuple(x.shape) for x in xs]}, "
                    f"got {[tuple(f.shape) for f in Fs]}"
                )
            Fs = tuple(f.to(x.dtype) for f, x in zip(Fs, xs))
            diff = [i for i, t in enumerate(theta) if isinstance(t, Tensor) and t.requires_grad]
            if not diff:
                return (None, None, *(None for _ in theta))
            u = _solve_adjoint(cfg, Fs, xs_req, v)
            gs = torch.autograd.grad(
                Fs, [theta[i] for i in diff], _unflat(u, Fs), allow_unused=True
            )
        out: list[Tensor | None] = [None] * len(theta)
        for i, g in zip(diff, gs):
            out[i] = None if g is None else -g
        return (None, None, *out)


def _check(tol: float, maxiter: int | None, ridge: float, solve) -> None:
    if not tol > 0:
        raise ValueError(f"Invalid tol: {tol}")
    if maxiter is not None and int(maxiter) < 1:
        raise ValueError(f"Invalid maxiter: {maxiter}")
    if not ridge >= 0:
        raise ValueError(f"Invalid ridge: {ridge}")
    if not (solve in ("cg", "normal_cg") or callable(solve)):
        raise ValueError(f"Invalid solve: {solve!r} (use 'cg', 'normal_cg' or a callable)")


def custom_root(
    optimality_fn: Callable[..., Solution],
    solve: LinearSolve = "normal_cg",
    *,
    tol: float = 1e-5,
    maxiter: int | None = None,
    ridge: float = 0.0,
) -> Callable[[Callable[..., Solution]], Callable[..., Solution]]:
    r"""Decorator making ``solver(init, *theta)`` differentiable in ``theta`` implicitly.

    The decorated solver runs without autograd on detached ``theta``; its output
    :math:`x^\star` gets a backward that solves :math:`A^\top u = v` with
    :math:`A = \partial_x F(x^\star, \theta)` (matrix-free, by conjugate gradient) and returns
    :math:`-\partial_\theta F(x^\star, \theta)^\top u` for every tensor in ``theta``
    (see the module docstring for the math and the solvers).

    Args:
        optimality_fn: ``F(x, *theta)``, zero at the solution, returning a tensor (or a tuple
            of tensors) with the shape of ``x``; it must be differentiable by autograd.
        solve: ``"normal_cg"`` (default; any invertible :math:`A`), ``"cg"`` (:math:`A`
            symmetric positive definite, e.g. a Hessian) or a callable
            ``solve(matvec, b) -> u`` with ``matvec(u) = A^T u`` on flat vectors.
        tol: relative residual tolerance of the conjugate-gradient solve (default ``1e-5``,
            jaxopt's).
        maxiter: iteration budget of the solve (default ``10 * x.numel()``).
        ridge: Tikhonov shift :math:`\rho \ge 0` added to the solved system.

    Returns:
        A decorator; the decorated function is called as ``solver(init, *theta)`` and
        returns what ``solver`` returns (a tensor or tuple of tensors), differentiable in
        every tensor of ``theta``. ``init`` receives no gradient. The linear-system error is
        reported by an :class:`ImplicitDiffWarning`; an ``optimality_fn`` whose output does
        not have the solution's shape raises ``ValueError`` when the gradient is computed.

    Example::

        >>> import torch
        >>> from gradkit.implicit import custom_root
        >>> def F(x, theta):  # stationarity of 0.5 ||x||^2 - theta . log(x)  (x = sqrt(theta))
        ...     return x - theta / x
        >>> @custom_root(F, tol=1e-12)
        ... def newton(x, theta):
        ...     for _ in range(50):
        ...         x = x - F(x, theta) / (1 + theta / x**2)
        ...     return x
        >>> theta = torch.tensor([4.0, 9.0], dtype=torch.float64, requires_grad=True)
        >>> x = newton(torch.ones(2, dtype=torch.float64), theta)
        >>> x.detach(), torch.autograd.grad(x.sum(), theta)[0]  # d sqrt(t)/dt = 1/(2 sqrt(t))
        (tensor([2., 3.], dtype=torch.float64), tensor([0.2500, 0.1667], dtype=torch.float64))
    """
    if not callable(optimality_fn):
        raise TypeError(f"optimality_fn must be callable, got {type(optimality_fn).__name__}")
    _check(tol, maxiter, ridge, solve)

    def decorator(solver: Callable[..., Solution]) -> Callable[..., Solution]:
        if not callable(solver):
            raise TypeError(f"the solver must be callable, got {type(solver).__name__}")

        @functools.wraps(solver)
        def wrapped(init: Any, *theta: Any) -> Solution:
            cfg = _Config(solver, optimality_fn, solve, float(tol), maxiter, float(ridge))
            return _ImplicitRoot.apply(cfg, init, *theta)

        return wrapped

    return decorator


def custom_fixed_point(
    fixed_point_fn: Callable[..., Solution],
    solve: LinearSolve = "normal_cg",
    *,
    tol: float = 1e-5,
    maxiter: int | None = None,
    ridge: float = 0.0,
) -> Callable[[Callable[..., Solution]], Callable[..., Solution]]:
    r"""Decorator for solvers of :math:`x = T(x, \theta)`: :func:`custom_root` on
    :math:`F(x, \theta) = T(x, \theta) - x`.

    The system solved is :math:`(\partial_x T - I)^\top u = v`. For a gradient-step map
    :math:`T = x - \eta \nabla_x f` this is :math:`-\eta H u = v`, negative definite, so keep
    the default ``"normal_cg"`` (``"cg"`` needs a positive definite system).

    Args:
        fixed_point_fn: ``T(x, *theta)`` returning a tensor (or tuple) of ``x``'s shape.
        solve: as in :func:`custom_root`.
        tol: as in :func:`custom_root`.
        maxiter: as in :func:`custom_root`.
        ridge: as in :func:`custom_root`.

    Returns:
        A decorator, as :func:`custom_root`.

    Example::

        >>> import torch
        >>> from gradkit.implicit import custom_fixed_point
        >>> def T(x, theta):  # gradient step on 0.5 (x - theta)^2 + 0.5 x^2, root x = theta/2
        ...     return x - 0.5 * ((x - theta) + x)
        >>> @custom_fixed_point(T, tol=1e-12)
        ... def iterate(x, theta):
        ...     for _ in range(100):
        ...         x = T(x, theta)
        ...     return x
        >>> theta = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
        >>> x = iterate(torch.zeros((), dtype=torch.float64), theta)
        >>> float(x.detach()), float(torch.autograd.grad(x, theta)[0])
        (1.5, 0.5)
    """
    if not callable(fixed_point_fn):
        raise TypeError(f"fixed_point_fn must be callable, got {type(fixed_point_fn).__name__}")

    def optimality_fn(x, *theta):
        t = fixed_point_fn(x, *theta)
        if isinstance(x, (tuple, list)):
            ts, _ = _as_tuple(t, "fixed_point_fn")
            if len(ts) != len(x):
                raise ValueError(
                    f"fixed_point_fn must return {len(x)} tensors (the solution's), got {len(ts)}"
                )
            return tuple(a - b for a, b in zip(ts, x))
        if not isinstance(t, Tensor):
            raise TypeError(f"fixed_point_fn must return a tensor, got {type(t).__name__}")
        if t.shape != x.shape:
            raise ValueError(
                f"fixed_point_fn(x, *theta) must return a tensor of the solution's shape "
                f"{tuple(x.shape)}, got {tuple(t.shape)}"
            )
        return t - x

    return custom_root(optimality_fn, solve, tol=tol, maxiter=maxiter, ridge=ridge)


def hypergradient(
    outer_loss: Callable[..., Tensor],
    inner_loss: Callable[..., Tensor],
    y: Tensor,
    theta: Sequence[Tensor],
    *,
    solve: LinearSolve = "cg",
    tol: float = 1e-5,
    maxiter: int | None = None,
    ridge: float = 0.0,
) -> tuple[Tensor, ...]:
    r"""Gradient of a bilevel objective :math:`\Phi(\theta) = f(y^\star(\theta), \theta)`,
    :math:`y^\star(\theta) = \arg\min_y g(y, \theta)`, at a given inner solution ``y``.

    With :math:`g` strongly convex in :math:`y` (stationarity :math:`\nabla_y g = 0`):

    .. math::
        \nabla \Phi(\theta) = \nabla_\theta f - \nabla^2_{\theta y} g\, z, \qquad
        \nabla^2_{yy} g\, z = \nabla_y f,

    all at :math:`(y, \theta)`. This is :func:`custom_root` with the optimality function
    :math:`F = \nabla_y g` applied to ``y`` (so :math:`z` is found by conjugate gradient with
    Hessian-vector products, never forming a Hessian), followed by autograd on
    :math:`f`; the direct term :math:`\nabla_\theta f` is included.

    Args:
        outer_loss: ``f(y, *theta)``, a scalar tensor.
        inner_loss: ``g(y, *theta)``, a scalar tensor, twice differentiable.
        y: the inner solution (any solver; it should satisfy :math:`\nabla_y g \approx 0`).
        theta: the hyperparameters (tensors).
        solve: linear solver of :func:`custom_root`; default ``"cg"`` (the Hessian of a
            strongly convex :math:`g` is symmetric positive definite).
        tol: as in :func:`custom_root`.
        maxiter: as in :func:`custom_root`.
        ridge: as in :func:`custom_root`.

    Returns:
        The gradient with respect to each tensor of ``theta`` (zeros where it does not
        enter), a tuple.

    Example::

        >>> import torch
        >>> from gradkit.implicit import hypergradient
        >>> f = lambda y, x: 0.5 * ((y - 1.0) ** 2).sum()  # outer
        >>> g = lambda y, x: 0.5 * ((y - x) ** 2).sum()    # inner: y*(x) = x
        >>> x = torch.tensor([3.0, 4.0], dtype=torch.float64)
        >>> hypergradient(f, g, x.clone(), (x,), tol=1e-12)  # = x - 1
        (tensor([2., 3.], dtype=torch.float64),)
    """
    theta = tuple(theta)
    if not all(isinstance(t, Tensor) and t.is_floating_point() for t in theta):
        raise TypeError("theta must be a sequence of floating-point tensors")
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a tensor, got {type(y).__name__}")

    def grad_g(yy: Tensor, *th: Tensor) -> Tensor:  # F = nabla_y g, differentiable in y, theta
        with torch.enable_grad():
            if not yy.requires_grad:
                yy = yy.detach().requires_grad_()
            return torch.autograd.grad(inner_loss(yy, *th), yy, create_graph=True)[0]

    root = custom_root(grad_g, solve, tol=tol, maxiter=maxiter, ridge=ridge)(
        lambda init, *th: y.detach()
    )
    with torch.enable_grad():
        th = tuple(t.detach().requires_grad_() for t in theta)
        f = outer_loss(root(None, *th), *th)
        gs = torch.autograd.grad(f, th, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(gs, theta))
