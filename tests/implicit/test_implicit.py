"""Implicit differentiation (gradkit.implicit) against closed forms, unrolled solvers,
gradcheck and torchopt."""

import doctest
import warnings

import pytest
import torch
import torch.nn.functional as Fn

import gradkit.implicit as I
from gradkit.implicit import ImplicitDiffWarning, custom_fixed_point, custom_root

D = torch.float64


def unrolled_gd(grad_fn, w, theta, lr, steps):
    """Plain gradient descent with autograd tracking every step (the unrolled reference)."""
    for _ in range(steps):
        w = w - lr * grad_fn(w, *theta)
    return w


# ---------------------------------------------------------------- ridge regression


def ridge_problem(n=20, d=4):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, d, generator=g, dtype=D)
    y = torch.randn(n, generator=g, dtype=D)
    return X, y


def ridge_F(w, lam, X, y):  # gradient of 0.5 ||X w - y||^2 + 0.5 lam ||w||^2
    return X.T @ (X @ w - y) + lam * w


def ridge_closed(lam, X, y):
    return torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1], dtype=D), X.T @ y)


def test_spec_known_answer_ridge_identity():
    # A = I, b = [1, 2], theta = 1: x* = [0.5, 1], d(sum x*)/dtheta = -0.75
    A = torch.eye(2, dtype=D)
    b = torch.tensor([1.0, 2.0], dtype=D)

    def F(x, theta):
        return A.T @ (A @ x - b) + theta * x

    def T(x, theta, eta=0.3):
        return x - eta * F(x, theta)

    for solve in ("cg", "normal_cg"):
        theta = torch.tensor(1.0, dtype=D, requires_grad=True)
        x = custom_root(F, solve, tol=1e-14)(lambda init, t: ridge_closed(t, A, b))(None, theta)
        assert torch.allclose(x, torch.tensor([0.5, 1.0], dtype=D))
        (g,) = torch.autograd.grad(x.sum(), theta)
        assert abs(float(g) + 0.75) < 1e-12
    theta = torch.tensor(1.0, dtype=D, requires_grad=True)
    x = custom_fixed_point(T, tol=1e-14)(lambda init, t: ridge_closed(t, A, b))(None, theta)
    (g,) = torch.autograd.grad(x.sum(), theta)
    assert abs(float(g) + 0.75) < 1e-12


@pytest.mark.parametrize("solve", ["cg", "normal_cg"])
def test_ridge_matches_closed_form_and_unrolled(solve):
    X, y = ridge_problem()
    lam0 = 2.0
    L = float(torch.linalg.eigvalsh(X.T @ X).max()) + lam0
    w0 = torch.zeros(X.shape[1], dtype=D)

    @custom_root(ridge_F, solve, tol=1e-13)
    def solver(init, lam, X, y):
        assert not torch.is_grad_enabled()  # the solver runs without autograd
        return unrolled_gd(ridge_F, init, (lam, X, y), 1.0 / L, 300)

    def leaves():
        return (
            torch.tensor(lam0, dtype=D, requires_grad=True),
            X.clone().requires_grad_(),
            y.clone().requires_grad_(),
        )

    v = torch.linspace(-1, 1, X.shape[1], dtype=D)
    grads = {}
    for name, fn in {
        "implicit": lambda t: solver(w0, *t),
        "unrolled": lambda t: unrolled_gd(ridge_F, w0, t, 1.0 / L, 300),
        "closed": lambda t: ridge_closed(*t),
    }.items():
        t = leaves()
        w = fn(t)
        grads[name] = torch.autograd.grad(w @ v, t)
    for a, b, c in zip(grads["implicit"], grads["unrolled"], grads["closed"]):
        assert torch.allclose(a, c, atol=1e-10, rtol=0)
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- logistic regression


def logreg_problem(n=40, d=5):
    g = torch.Generator().manual_seed(2)
    X = torch.randn(n, d, generator=g, dtype=D)
    labels = (torch.rand(n, generator=g, dtype=D) < torch.sigmoid(X @ torch.ones(d, dtype=D)))
    return X, labels.to(D)


def logreg_loss(w, log_lam, weights, X, labels):
    # per-example weighted logistic loss + 0.5 exp(log_lam) ||w||^2
    losses = Fn.binary_cross_entropy_with_logits(X @ w, labels, reduction="none")
    return (weights * losses).mean() + 0.5 * torch.exp(log_lam) * (w @ w)


def logreg_F(w, log_lam, weights, X, labels):  # the gradient of logreg_loss in w
    return X.T @ (weights * (torch.sigmoid(X @ w) - labels)) / X.shape[0] + torch.exp(log_lam) * w


def test_logreg_F_is_the_gradient():
    X, labels = logreg_problem()
    w = torch.randn(X.shape[1], dtype=D, requires_grad=True)
    ll, wt = torch.tensor(-1.0, dtype=D), torch.rand(X.shape[0], dtype=D)
    (g,) = torch.autograd.grad(logreg_loss(w, ll, wt, X, labels), w)
    assert torch.allclose(g, logreg_F(w, ll, wt, X, labels))


@pytest.mark.parametrize("solve", ["cg", "normal_cg"])
def test_logistic_regression_matches_unrolled(solve):
    X, labels = logreg_problem()
    lr, steps = 1.0, 200

    def gd(w, log_lam, weights):
        for _ in range(steps):
            w = w - lr * logreg_F(w, log_lam, weights, X, labels)
        return w

    @custom_root(lambda w, ll, wt: logreg_F(w, ll, wt, X, labels), solve, tol=1e-12)
    def solver(init, log_lam, weights):
        return gd(init, log_lam, weights).detach()

    def leaves():
        return (
            torch.tensor(-1.0, dtype=D, requires_grad=True),
            torch.linspace(0.5, 1.5, X.shape[0], dtype=D).requires_grad_(),
        )

    w0 = torch.zeros(X.shape[1], dtype=D)
    t1, t2 = leaves(), leaves()
    w_imp = solver(w0, *t1)
    w_unr = gd(w0, *t2)
    assert torch.allclose(w_imp, w_unr, atol=1e-12)
    assert float(logreg_F(w_imp, *t1, X, labels).detach().norm()) < 1e-12
    outer = torch.randn(X.shape[1], dtype=D)
    g_imp = torch.autograd.grad(w_imp @ outer, t1)
    g_unr = torch.autograd.grad(w_unr @ outer, t2)
    for a, b in zip(g_imp, g_unr):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
        assert a.abs().max() > 1e-3  # a non-trivial hypergradient


def test_fixed_point_equals_root():
    X, labels = logreg_problem()
    eta = 0.7

    def F(w, log_lam):
        return logreg_F(w, log_lam, torch.ones(X.shape[0], dtype=D), X, labels)

    def T(w, log_lam):
        return w - eta * F(w, log_lam)

    def inner(init, log_lam):
        w = init
        for _ in range(200):
            w = T(w, log_lam).detach()
        return w

    w0 = torch.zeros(X.shape[1], dtype=D)
    out = []
    for dec in (custom_root(F, tol=1e-13), custom_fixed_point(T, tol=1e-13)):
        ll = torch.tensor(-1.0, dtype=D, requires_grad=True)
        w = dec(inner)(w0, ll)
        out.append(torch.autograd.grad(w.sum(), ll)[0])
    assert torch.allclose(out[0], out[1], atol=1e-10, rtol=0)


def test_gradcheck_tiny_problem():
    X, y = ridge_problem(n=6, d=3)
    solver = custom_root(ridge_F, "normal_cg", tol=1e-14)(lambda init, *t: ridge_closed(*t))
    lam = torch.tensor(0.7, dtype=D, requires_grad=True)
    Xr, yr = X.clone().requires_grad_(), y.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: solver(None, *t), (lam, Xr, yr))


def test_tuple_solution_and_nontensor_theta():
    # ridge with an unpenalised bias: x = (w, b); the penalty scale is a python float
    X, y = ridge_problem(n=15, d=3)

    def F(x, lam, scale):
        w, b = x
        r = X @ w + b - y
        return (X.T @ r + scale * lam * w, r.sum())

    def closed(lam, scale):
        Z = torch.cat([X, torch.ones(X.shape[0], 1, dtype=D)], 1)
        P = torch.diag(torch.cat([scale * lam * torch.ones(3, dtype=D), torch.zeros(1, dtype=D)]))
        sol = torch.linalg.solve(Z.T @ Z + P, Z.T @ y)
        return sol[:3], sol[3]

    solver = custom_root(F, tol=1e-14)(lambda init, lam, scale: closed(lam, scale))
    lam1 = torch.tensor(0.5, dtype=D, requires_grad=True)
    lam2 = torch.tensor(0.5, dtype=D, requires_grad=True)
    w1, b1 = solver(None, lam1, 2.0)
    w2, b2 = closed(lam2, 2.0)
    assert torch.allclose(w1, w2) and torch.allclose(b1, b2)
    g1 = torch.autograd.grad(w1.sum() + 3 * b1, lam1)[0]
    g2 = torch.autograd.grad(w2.sum() + 3 * b2, lam2)[0]
    assert torch.allclose(g1, g2, atol=1e-10, rtol=0)


def test_init_gets_no_gradient_and_callable_solve():
    X, y = ridge_problem(n=8, d=3)

    def dense_solve(matvec, b):  # materialise A^T column by column, solve exactly
        At = torch.stack([matvec(e) for e in torch.eye(b.numel(), dtype=b.dtype)], 1)
        return torch.linalg.solve(At, b)

    solver = custom_root(ridge_F, dense_solve)(lambda init, *t: ridge_closed(*t) + 0 * init)
    init = torch.ones(3, dtype=D, requires_grad=True)
    lam = torch.tensor(1.5, dtype=D, requires_grad=True)
    w = solver(init, lam, X, y)
    g_init, g_lam = torch.autograd.grad(w.sum(), (init, lam), allow_unused=True)
    assert g_init is None
    lam2 = torch.tensor(1.5, dtype=D, requires_grad=True)
    (g_ref,) = torch.autograd.grad(ridge_closed(lam2, X, y).sum(), lam2)
    assert torch.allclose(g_lam, g_ref, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- warnings and bad input


def test_nonconvergence_warns_with_residual_and_convergence_is_silent():
    X, y = ridge_problem(n=30, d=8)
    lam = torch.tensor(0.01, dtype=D, requires_grad=True)
    bad = custom_root(ridge_F, "cg", tol=1e-12, maxiter=2)(lambda i, *t: ridge_closed(*t))
    with pytest.warns(ImplicitDiffWarning, match=r"did not converge in 2 iterations.*residual"):
        torch.autograd.grad(bad(None, lam, X, y).sum(), lam)
    good = custom_root(ridge_F, "cg", tol=1e-10)(lambda i, *t: ridge_closed(*t))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.autograd.grad(good(None, lam, X, y).sum(), lam)


def test_optimality_fn_of_wrong_shape_is_a_clear_error():
    solver = custom_root(lambda x, t: torch.cat([x, t]))(lambda init, t: t * 2)
    t = torch.ones(2, dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match=r"optimality_fn.*solution's shape \[\(2,\)\].*\(4,\)"):
        solver(None, t).sum().backward()
    fp = custom_fixed_point(lambda x, t: x[:1])(lambda init, t: t * 2)
    with pytest.raises(ValueError, match=r"fixed_point_fn.*solution's shape \(2,\), got \(1,\)"):
        fp(None, t).sum().backward()


def test_bad_arguments():
    F = ridge_F
    with pytest.raises(ValueError, match="Invalid tol: 0"):
        custom_root(F, tol=0)
    with pytest.raises(ValueError, match="Invalid maxiter: 0"):
        custom_root(F, maxiter=0)
    with pytest.raises(ValueError, match="Invalid ridge: -1"):
        custom_root(F, ridge=-1.0)
    with pytest.raises(ValueError, match="Invalid solve: 'gmres'"):
        custom_root(F, "gmres")
    with pytest.raises(TypeError, match="optimality_fn must be callable"):
        custom_root(None)
    with pytest.raises(TypeError, match="the solver must return a floating-point tensor"):
        custom_root(F)(lambda init, t: [1.0])(None, torch.ones(1, requires_grad=True))


def test_docstring_examples_run():
    assert doctest.testmod(I, optionflags=doctest.NORMALIZE_WHITESPACE).attempted >= 3
    assert doctest.testmod(I).failed == 0


# ---------------------------------------------------------------- torchopt


def test_matches_torchopt_implicit_gradients():
    torchopt = pytest.importorskip("torchopt")
    from torchopt.diff.implicit import custom_root as to_custom_root

    X, labels = logreg_problem()
    weights = torch.ones(X.shape[0], dtype=D)

    def F(w, log_lam):
        return logreg_F(w, log_lam, weights, X, labels)

    def inner(init, log_lam):
        w = init.detach()
        for _ in range(200):
            w = (w - F(w, log_lam.detach())).detach()
        return w

    w0 = torch.zeros(X.shape[1], dtype=D)
    ll1 = torch.tensor(-1.0, dtype=D, requires_grad=True)
    ll2 = torch.tensor(-1.0, dtype=D, requires_grad=True)
    ours = custom_root(F, "normal_cg", tol=1e-12)(inner)(w0, ll1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torchopt calls functorch.vjp
        theirs = to_custom_root(
            F, argnums=1, solve=torchopt.linear_solve.solve_normal_cg(rtol=1e-12, maxiter=200)
        )(inner)(w0, ll2)
        (g2,) = torch.autograd.grad(theirs.sum(), ll2)
    (g1,) = torch.autograd.grad(ours.sum(), ll1)
    assert torch.allclose(ours, theirs)
    assert torch.allclose(g1, g2, atol=1e-9, rtol=0)


# ---------------------------------------------------------------- bilevel hypergradient


def test_hypergradient_known_answer_quadratic():
    # f = 0.5 ||y - a||^2, g = 0.5 ||y - x||^2: y* = x, grad Phi = x - a
    a = torch.tensor([0.5, -1.0], dtype=D)
    x = torch.tensor([3.0, 4.0], dtype=D)
    (g,) = I.hypergradient(
        lambda y, x: 0.5 * ((y - a) ** 2).sum(), lambda y, x: 0.5 * ((y - x) ** 2).sum(),
        x.clone(), (x,), tol=1e-12,
    )
    assert torch.allclose(g, x - a)


@pytest.mark.parametrize("solve", ["cg", "normal_cg"])
def test_hypergradient_ridge_validation_loss_matches_closed_form(solve):
    # outer: validation loss + 0.1 lam^2 (a direct term); inner: ridge on the training set
    X, y = ridge_problem(n=20, d=4)
    Xv, yv = X[:7] + 0.1, y[:7] - 0.2

    def outer(w, lam, yt):
        return 0.5 * ((Xv @ w - yv) ** 2).sum() + 0.1 * lam**2

    def inner(w, lam, yt):
        return 0.5 * ((X @ w - yt) ** 2).sum() + 0.5 * lam * (w @ w)

    lam = torch.tensor(0.8, dtype=D)
    w_star = ridge_closed(lam, X, y)
    grads = I.hypergradient(outer, inner, w_star, (lam, y), solve=solve, tol=1e-13)
    lr, yr = lam.clone().requires_grad_(), y.clone().requires_grad_()
    ref = torch.autograd.grad(outer(ridge_closed(lr, X, yr), lr, yr), (lr, yr))
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)
    assert not lam.requires_grad and grads[0].requires_grad is False


def test_hyper_cleaning_example_improves_over_noisy_training(monkeypatch, capsys):
    import re
    import runpy
    from pathlib import Path

    pytest.importorskip("sklearn")
    script = Path(__file__).resolve().parents[2] / "examples" / "hyper_cleaning.py"
    monkeypatch.setattr("sys.argv", [str(script), "--outer-steps", "5"])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    acc = {
        m.group(1): float(m.group(3))
        for m in re.finditer(r"^(trained on noisy labels|hyper-cleaned).*?([\d.]+)\s+([\d.]+)$",
                             out, re.M)
    }
    assert acc["hyper-cleaned"] > acc["trained on noisy labels"] + 0.03


def test_solver_that_uses_autograd_itself():
    # an inner solver written with torch.optim and loss.backward() (it enables autograd locally)
    X, y = ridge_problem(n=12, d=3)

    def solver(init, lam, X, y):
        assert not lam.requires_grad  # the solver sees detached hyperparameters
        w = init.clone().requires_grad_()
        opt = torch.optim.LBFGS([w], max_iter=100, tolerance_grad=1e-12, tolerance_change=0)
        with torch.enable_grad():
            def closure():
                opt.zero_grad()
                loss = 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * lam * (w @ w)
                loss.backward()
                return loss
            opt.step(closure)
        return w

    lam = torch.tensor(0.3, dtype=D, requires_grad=True)
    w = custom_root(ridge_F, "cg", tol=1e-12)(solver)(torch.zeros(3, dtype=D), lam, X, y)
    (g,) = torch.autograd.grad(w.sum(), lam)
    lam2 = torch.tensor(0.3, dtype=D, requires_grad=True)
    (ref,) = torch.autograd.grad(ridge_closed(lam2, X, y).sum(), lam2)
    assert torch.allclose(g, ref, atol=1e-8, rtol=0)
