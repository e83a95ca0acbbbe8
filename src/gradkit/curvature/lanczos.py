r"""Extreme eigenpairs of a symmetric :class:`LinearOperator`: Lanczos and power iteration.

``lanczos`` is a thick-restart (block) Lanczos method with full reorthogonalization
(Wu & Simon, "Thick-restart Lanczos method for large symmetric eigenvalue problems", SIAM
J. Matrix Anal. Appl. 22(2), 2000; block form as in Golub & Van Loan §10.3.6). With an
orthonormal basis :math:`V_m` whose last block is :math:`V_{\mathrm{last}}`:

.. math::
    \begin{aligned}
        A V_m &= V_m H_m + Q R\, E_{\mathrm{last}}^\top, \qquad H_m = V_m^\top A V_m \\
        H_m &= S \Theta S^\top \quad\text{(Rayleigh-Ritz)}, \qquad
        r_i = \lVert A V_m s_i - \theta_i V_m s_i \rVert = \lVert R\, S_{\mathrm{last}, i}
            \rVert \\
        \text{converged} &\iff r_i
            \le \mathrm{tol}\cdot\max(|\theta_i|,\ \epsilon^{2/3} \lVert H_m \rVert)
            \quad\text{for every wanted } i
    \end{aligned}

Each new block is orthogonalized against the whole basis twice (classical Gram-Schmidt,
"twice is enough"), and its coefficients fill :math:`H_m` exactly, so after a restart that
keeps the ``p`` best Ritz vectors the relation above still holds with
:math:`H = \mathrm{diag}(\theta_{1..p})` bordered by the coupling :math:`R S_{\mathrm{last}}`.

What ``tol`` guarantees. For every returned pair there is an eigenvalue :math:`\lambda` of
``A`` with :math:`|\lambda - \theta_i| \le r_i \le \mathrm{tol}\,|\theta_i|` (Krylov-Bogoliubov /
Weyl; Parlett, *The Symmetric Eigenvalue Problem*, Thm 4.5.1): a bound, not an estimate. It
is the stopping rule of ARPACK (SciPy's ``eigsh``). The sharper Kato-Temple bound
:math:`r_i^2/\delta_i` (Parlett Thm 11.7.1) needs the distance :math:`\delta_i` from
:math:`\theta_i` to the rest of the spectrum; the distance to the nearest other *Ritz* value
can overstate it by far while two close eigenvalues are still represented by one Ritz value,
so it is not used for stopping (an earlier version did, and accepted such unresolved pairs:
for the spectrum ``10, 9, 8, 7, 6, 5.92`` above a bulk in ``[0, 5]``, 18 of 20 random starts
returned :math:`\lambda_5` wrong by up to 14 times ``tol``). Like every Krylov method,
Lanczos can still miss an eigenvalue whose eigenvector is (nearly) orthogonal to the start
(misconvergence): then the returned :math:`\theta_i` is an accurate eigenvalue, but not the
:math:`i`-th largest. Its probability falls with the start's weight on that eigenvector
(SciPy's ``eigsh`` misses :math:`\lambda_5` on 1 of those 20 starts); use ``block_size >= 2``
or a tighter ``tol`` where this matters. A single start vector finds each distinct
eigenvalue once in exact arithmetic; use ``block_size >= multiplicity`` to resolve repeated
ones.

``power_iteration`` returns the largest-MAGNITUDE eigenvalues, one at a time with projection
deflation (as PyHessian's ``eigenvalues``); Lanczos ``which="largest"`` returns the largest
algebraic ones. For the spectrum {-10, 3} the first gives -10 and the second 3 (Cockpit's
``use_power`` vs ``eigsh`` difference).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from gradkit.curvature._operator import LinearOperator
from gradkit.curvature._random import randn, resolve_generator

Which = Literal["largest", "smallest", "both"]
Start = Tensor | Literal["auto", "random", "gradient"] | None
_GRADIENT_START_NOISE = 0.1  # weight of the random part of the gradient start (unit norms)


def _start_block(op: LinearOperator, v0: Start, which: Which, b: int, gen: torch.Generator
                 ) -> Tensor:
    """The start block ``(n, b)`` (see ``v0`` in :func:`lanczos`)."""
    n, dtype, device = op.shape[0], op.dtype, op.device
    if isinstance(v0, Tensor):
        return v0.reshape(n, -1).to(dtype=dtype, device=device)
    if v0 not in (None, "auto", "random", "gradient"):
        raise ValueError(f"Invalid v0: {v0!r} (use a tensor, 'auto', 'random' or 'gradient')")
    z = randn((n, b), dtype, device, gen)
    gradient = getattr(op, "gradient", None)
    use_gradient = v0 == "gradient" or (
        v0 in (None, "auto") and b == 1 and which != "smallest" and callable(gradient))
    if not use_gradient:
        return z
    if not callable(gradient):
        raise ValueError(f"v0='gradient' needs an operator with a gradient(), got "
                         f"{type(op).__name__}")
    g = gradient().to(dtype=dtype, device=device).reshape(n, 1)
    norm = g.norm()
    if not (torch.isfinite(norm) and norm > 0):
        return z
    return g / norm + _GRADIENT_START_NOISE * z / z.norm(dim=0, keepdim=True)


@dataclass
class EigenInfo:
    """Diagnostics of an eigensolver run."""

    num_matvecs: int
    converged: bool
    residuals: Tensor  # ||A v_i - lambda_i v_i|| of the returned pairs
    num_restarts: int = 0


def _wanted(theta: Tensor, k: int, which: Which, p: int | None = None) -> Tensor:
    """Indices (into ascending ``theta``) of the ``k`` (or ``p`` >= k) wanted Ritz values."""
    m = theta.shape[0]
    count = min(m, k if p is None else p)
    if which == "largest":
        return torch.arange(m - count, m)
    if which == "smallest":
        return torch.arange(count)
    low = count // 2
    return torch.cat([torch.arange(low), torch.arange(m - (count - low), m)])


def _orthonormalize(Vt: Tensor, W: Tensor, gen: torch.Generator, scale: float
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Orthogonalize ``W`` against the basis ``V = Vt^T`` twice and QR it: ``W = V h + Q R``.

    The basis is stored as contiguous rows ``Vt`` (fast products). Columns of ``W``
    (numerically) inside span(V) are replaced by random orthonormal directions with a zero row
    in ``R`` (a breakdown: an invariant subspace was found).
    """
    V = Vt.T
    h = Vt @ W
    W = W - V @ h
    h2 = Vt @ W
    W = W - V @ h2
    h = h + h2
    if W.shape[1] == 1:  # a plain normalization (cheaper than a QR factorization)
        R = W.norm().reshape(1, 1)
        Q = W / R.clamp(min=torch.finfo(W.dtype).tiny)
    else:
        Q, R = torch.linalg.qr(W)
    tiny = 1e3 * torch.finfo(W.dtype).eps * max(scale, 1e-300)
    for i in torch.nonzero(R.norm(dim=1) <= tiny).flatten().tolist():
        R[i] = 0
        others = torch.cat([V, Q[:, :i], Q[:, i + 1:]], dim=1)
        z = randn((W.shape[0], 1), W.dtype, W.device, gen)
        for _ in range(2):
            z = z - others @ (others.T @ z)
        Q[:, i] = (z / z.norm()).squeeze(1)
    return h, Q, R


def lanczos(
    op: LinearOperator,
    k: int = 1,
    which: Which = "largest",
    *,
    max_iter: int | None = None,
    tol: float = 1e-4,
    ncv: int | None = None,
    block_size: int = 1,
    v0: Start = None,
    generator: torch.Generator | None = None,
    return_info: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, EigenInfo]:
    """``k`` extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

    Default start (``v0=None`` = "auto"): for an operator with a ``gradient()`` (the
    curvature operators of a model's loss), ``block_size=1`` and ``which`` "largest" or
    "both", the normalized loss gradient plus 0.1 times a unit Gaussian vector; otherwise a
    Gaussian vector. The gradient of a trained network lies mostly in the top Hessian
    eigenspace (Gur-Ari, Roberts & Dyer, "Gradient Descent Happens in a Tiny Subspace",
    2018), so the Krylov space reaches the top eigenvector sooner; the random part keeps every
    eigendirection present (and is the whole start if the gradient is zero or not finite).
    Measured on the digits MLP of ``benchmarks/hessian.py``: top-1 to ``tol=1e-3`` in 4
    products instead of 5-7, top-10 in 23-24 instead of 23-27. Cost: one gradient pass over
    the data (free for a cached :class:`HessianOperator`, whose graph already holds it); it
    is not counted in ``num_matvecs``. The result does not depend on the start beyond ``tol``.

    Args:
        op: the operator.
        k: number of eigenpairs.
        which: "largest" (algebraic, returned descending), "smallest" (returned ascending) or
            "both" (``k // 2`` smallest and ``k - k // 2`` largest, returned ascending, like
            SciPy's ``eigsh(which="BE")``).
        max_iter: budget of matrix-vector products (default ``max(20 * ncv, 500)``); when it
            runs out a ``RuntimeWarning`` is issued and the current Ritz pairs are returned.
        tol: relative residual tolerance: every returned eigenvalue is within
            ``tol * |eigenvalue|`` of an eigenvalue of ``op`` (module docstring, which also
            says when it may not be the wanted one).
        ncv: largest basis size before a thick restart (default ``max(3k, 30) + 2 block_size``,
            at most ``n``); memory is ``n * ncv`` numbers.
        block_size: vectors per Lanczos block (``>=`` the multiplicity to resolve).
        v0: start vector ``(n,)`` or block ``(n, block_size)``, or "auto" (``None``, see
            above), "random" (Gaussian) or "gradient" (the gradient start above, any
            ``which``; needs ``op.gradient()``).
        generator: source of the random start (part) and of breakdown replacements.
        return_info: also return an :class:`EigenInfo`.

    Returns:
        ``(eigenvalues (k,), eigenvectors (n, k))`` [, info].

    Example::

        >>> import torch
        >>> from gradkit.curvature import MatrixOperator, lanczos
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> vals, vecs, info = lanczos(MatrixOperator(A), k=3, tol=1e-8, return_info=True,
        ...                            generator=torch.Generator().manual_seed(0))
        >>> vals.round(decimals=6)
        tensor([100.,  99.,  98.], dtype=torch.float64)
        >>> bool((info.residuals <= 1e-8 * vals).all()), vecs.shape
        (True, torch.Size([100, 3]))
    """
    n = op.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"Invalid k: {k} (need 1 <= k <= {n})")
    if which not in ("largest", "smallest", "both"):
        raise ValueError(f"Invalid which: {which!r} (use 'largest', 'smallest' or 'both')")
    if not tol > 0:
        raise ValueError(f"Invalid tol: {tol}")
    b = int(block_size)
    if not 1 <= b <= n:
        raise ValueError(f"Invalid block_size: {block_size}")
    ncv = min(n, max(3 * k, 30) + 2 * b) if ncv is None else min(int(ncv), n)
    if ncv < n and ncv < k + 2 * b:
        raise ValueError(f"Invalid ncv: {ncv} (need ncv >= k + 2 * block_size = {k + 2 * b})")
    max_iter = max(20 * ncv, 500) if max_iter is None else int(max_iter)
    gen = resolve_generator(generator)
    dtype, device = op.dtype, op.device
    eps23 = torch.finfo(dtype).eps ** (2 / 3)

    start = _start_block(op, v0, which, b, gen)
    if start.shape[1] != b:
        raise ValueError(f"v0 must have {b} column(s), got {start.shape[1]}")
    # basis vectors as rows; rows >= m are never read, so no zero fill (untouched pages of a
    # large buffer are never faulted in when few products are needed)
    Vt = torch.empty(ncv + b, n, dtype=dtype, device=device)
    H = torch.zeros(ncv + b, ncv + b, dtype=torch.float64)
    Vt[:b] = torch.linalg.qr(start).Q.T
    m, matvecs, restarts, scale = b, 0, 0, 0.0
    while True:
        last = slice(m - b, m)
        W = op.matmat(Vt[last].T)
        matvecs += b
        scale = max(scale, float(W.norm(dim=0).max()))
        h, Q, R = _orthonormalize(Vt[:m], W, gen, scale)
        H[:m, last] = h.to(torch.float64)
        H[last, :m] = h.T.to(torch.float64)
        theta, S = torch.linalg.eigh((H[:m, :m] + H[:m, :m].T) / 2)
        resid = (R.to(torch.float64) @ S[last]).norm(dim=0)
        want = _wanted(theta, k, which)
        bound = tol * torch.clamp(theta[want].abs(), min=eps23 * float(theta.abs().max()))
        full = m + b > n or (m == n)
        done = m >= k and bool((resid[want] <= bound).all())
        if done or full or matvecs + b > max_iter:
            break
        if m + b > ncv:  # thick restart: keep the p best Ritz vectors plus the new block
            p = min(ncv - 2 * b, k + max(0, (ncv - 2 * b - k) // 2))
            keep = _wanted(theta, k, which, p=p)
            p = keep.shape[0]
            Vt[:p] = S[:, keep].T.to(dtype) @ Vt[:m]
            H.zero_()
            H[:p, :p] = torch.diag(theta[keep])
            coupling = R.to(torch.float64) @ S[last][:, keep]
            H[p:p + b, :p] = coupling
            H[:p, p:p + b] = coupling.T
            m = p
            restarts += 1
        Vt[m:m + b] = Q.T
        m += b
    if not (done or full):
        warnings.warn(
            f"lanczos stopped after {matvecs} matrix-vector products (max_iter) before all {k} "
            f"Ritz pairs met tol={tol}; largest relative residual "
            f"{float((resid[want] / theta[want].abs().clamp(min=1e-300)).max()):.2e}",
            RuntimeWarning, stacklevel=2,
        )
    order = want if which != "largest" else want.flip(0)
    vals = theta[order].to(dtype)
    vecs = Vt[:m].T @ S[:, order].to(dtype)
    if not return_info:
        return vals, vecs
    info = EigenInfo(matvecs, bool(done or full), resid[order].to(dtype), restarts)
    return vals, vecs, info


def power_iteration(
    op: LinearOperator,
    k: int = 1,
    *,
    max_iter: int = 1000,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
    return_info: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, EigenInfo]:
    r"""The ``k`` largest-magnitude eigenpairs by power iteration with projection deflation.

    For the ``j``-th pair the iteration runs on :math:`(I - P_j) A (I - P_j)` with
    :math:`P_j` the projector onto the pairs already found:

    .. math::
        \begin{aligned}
            w &= (I - P_j) A v, \qquad \theta = v^\top w, \qquad v \leftarrow w / \lVert w\rVert
                \\
            \text{stop when } & \lVert w - \theta v \rVert \le \mathrm{tol}\cdot|\theta|
                \text{ or after } \texttt{max\_iter} \text{ products}
        \end{aligned}

    (a residual test; PyHessian stops when consecutive Rayleigh quotients agree to ``tol``,
    which can stop early on slowly converging problems). Eigenvalues are returned in the
    order found (descending magnitude); eigenvectors as columns ``(n, k)``.

    Args:
        op: the operator.
        k: number of eigenpairs.
        max_iter: products per eigenpair before giving up with a ``RuntimeWarning``.
        tol: relative residual tolerance (above).
        generator: source of the random start vectors.
        return_info: also return an :class:`EigenInfo`.

    Returns:
        ``(eigenvalues (k,), eigenvectors (n, k))`` [, info].

    Example::

        >>> import torch
        >>> from gradkit.curvature import MatrixOperator, power_iteration
        >>> A = torch.diag(torch.tensor([-10.0, 3.0, 1.0], dtype=torch.float64))
        >>> vals, _ = power_iteration(MatrixOperator(A), 1, tol=1e-10,
        ...                           generator=torch.Generator().manual_seed(0))
        >>> round(float(vals[0]), 6)  # largest magnitude, not largest algebraic
        -10.0
    """
    n = op.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"Invalid k: {k} (need 1 <= k <= {n})")
    if max_iter < 1:
        raise ValueError(f"Invalid max_iter: {max_iter}")
    if not tol > 0:
        raise ValueError(f"Invalid tol: {tol}")
    gen = resolve_generator(generator)
    found = torch.zeros(n, 0, dtype=op.dtype, device=op.device)
    vals, resids, matvecs, all_ok = [], [], 0, True

    def deflate(x: Tensor) -> Tensor:
        return x - found @ (found.T @ x)

    for _ in range(k):
        v = deflate(randn((n,), op.dtype, op.device, gen))
        v = v / v.norm()
        theta, r = torch.zeros((), dtype=op.dtype), torch.tensor(float("inf"))
        for _ in range(max_iter):
            w = deflate(op.matvec(v))
            matvecs += 1
            theta = v @ w
            r = (w - theta * v).norm()
            if r <= tol * theta.abs():
                v = (w / w.norm()) if w.norm() > 0 else v
                break
            if w.norm() == 0:  # v is in the null space of the deflated operator
                break
            v = w / w.norm()
        else:
            all_ok = False
        v = deflate(v)
        v = v / v.norm()
        found = torch.cat([found, v.unsqueeze(1)], dim=1)
        vals.append(theta)
        resids.append(r)
    if not all_ok:
        warnings.warn(f"power_iteration hit max_iter={max_iter} before tol={tol}",
                      RuntimeWarning, stacklevel=2)
    values = torch.stack(vals)
    if not return_info:
        return values, found
    return values, found, EigenInfo(matvecs, all_ok, torch.stack(resids))
