"""Known-answer tests 4, 5, 10, 11 (docs/curvature.md) and the empirical Fisher: operators
against dense float64 oracles."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradkit.curvature import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    LinearOperator,
    hvp,
    lanczos,
)
from tests.curvature._helpers import (
    TinyCNN,
    dense_ggn,
    dense_grad,
    dense_hessian,
    flat_params,
    per_example_grad_matrix,
    tiny_mlp,
)

F64 = torch.float64
CE = nn.functional.cross_entropy


def mlp_problem(N=12):
    return tiny_mlp(), torch.randn(N, 4, dtype=F64), torch.randint(0, 3, (N,))


def cnn_problem(N=6):
    return TinyCNN().double(), torch.randn(N, 1, 5, 5, dtype=F64), torch.randint(0, 3, (N,))


# --- KAT 4: torch.func.hessian oracle ----------------------------------------------------
@pytest.mark.parametrize("problem", [mlp_problem, cnn_problem])
@pytest.mark.parametrize("cache", [True, False])
def test_hessian_matches_torch_func_hessian(problem, cache):
    model, X, y = problem()
    op = HessianOperator(model, CE, (X, y), cache=cache)
    torch.testing.assert_close(op.to_dense(), dense_hessian(model, CE, X, y))


@pytest.mark.parametrize("problem", [mlp_problem, cnn_problem])
def test_ggn_matches_dense_jt_hout_j(problem):
    model, X, y = problem()
    G = GGNOperator(model, CE, (X, y)).to_dense()
    torch.testing.assert_close(G, dense_ggn(model, CE, X, y))
    assert torch.linalg.eigvalsh(G).min() > -1e-10  # PSD for a convex loss


def test_ggn_mse_multi_output_and_rev_rev_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, Y = torch.randn(9, 3, dtype=F64), torch.randn(9, 2, dtype=F64)
    loss = nn.functional.mse_loss
    expected = dense_ggn(model, loss, X, Y)
    # torch 2.13's forward-mode rule of mse_loss's backward fails on the target's ZeroTensor
    # tangent, so "auto" exercises the fallback here.
    for mode in ("auto", "rev-rev"):
        torch.testing.assert_close(GGNOperator(model, loss, (X, Y), mode=mode).to_dense(),
                                   expected)


def test_empirical_fisher_is_mean_of_per_example_outer_products():
    model, X, y = mlp_problem(10)
    G = per_example_grad_matrix(model, CE, X, y)
    for mode in ("fwd-rev", "rev-rev"):
        F = EmpiricalFisherOperator(model, CE, [(X[:7], y[:7]), (X[7:], y[7:])], mode=mode)
        torch.testing.assert_close(F.to_dense(), G.T @ G / 10)


def test_parameter_subset_is_the_hessian_block():
    model, X, y = mlp_problem()
    names = ["2.weight", "2.bias"]
    H = dense_hessian(model, CE, X, y)
    n0 = sum(p.numel() for n, p in model.named_parameters() if n not in names)
    block = HessianOperator(model, CE, (X, y), params=names)
    assert block.shape == (H.shape[0] - n0,) * 2
    torch.testing.assert_close(block.to_dense(), H[n0:, n0:])
    torch.testing.assert_close(GGNOperator(model, CE, (X, y), params=names).to_dense(),
                               dense_ggn(model, CE, X, y)[n0:, n0:])
    with pytest.raises(ValueError, match="unknown parameter"):
        HessianOperator(model, CE, (X, y), params=["nope"])


# --- KAT 5: finite differences --------------------------------------------------------
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-7), (torch.float32, 2e-2)])
def test_hvp_matches_central_finite_difference(dtype, rtol):
    model = tiny_mlp().to(dtype)
    X, y = torch.randn(12, 4, dtype=dtype), torch.randint(0, 3, (12,))
    _, theta = flat_params(model)
    v = torch.randn(theta.shape[0], dtype=dtype)
    v = v / v.norm()
    eps = torch.finfo(dtype).eps ** (1 / 3)
    fd = (dense_grad(model, CE, X, y, theta + eps * v)
          - dense_grad(model, CE, X, y, theta - eps * v)) / (2 * eps)
    scale = float(fd.abs().max())
    for mode in ("fwd-rev", "rev-rev"):
        Hv = hvp(model, CE, X, y, v, mode=mode)
        torch.testing.assert_close(Hv, fd, rtol=0, atol=rtol * scale)


def test_functional_hvp_layouts_agree():
    model, X, y = mlp_problem()
    H = dense_hessian(model, CE, X, y)
    V = torch.randn(H.shape[0], 3, dtype=F64)
    torch.testing.assert_close(hvp(model, CE, X, y, V), H @ V)
    as_dict = {n: t for n, t in zip([n for n, _ in model.named_parameters()],
                                    torch.split(V[:, 0], [p.numel() for p in model.parameters()]))}
    as_dict = {n: t.reshape(p.shape) for (n, p), t in zip(model.named_parameters(),
                                                           as_dict.values())}
    out = hvp(model, CE, X, y, as_dict)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in out.values()]), H @ V[:, 0])


class Cube(torch.autograd.Function):
    """x**3 with a double-differentiable backward but no forward-mode (jvp) rule."""

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


class CubeNet(nn.Module):
    def __init__(self, custom):
        super().__init__()
        self.lin = nn.Linear(3, 4).double()
        self.out = nn.Linear(4, 2).double()
        self.custom = custom

    def forward(self, x):
        h = self.lin(x)
        return self.out(Cube.apply(h) if self.custom else h**3)


def test_falls_back_to_reverse_over_reverse_without_forward_mode_rule():
    plain, custom = CubeNet(False), CubeNet(True)
    custom.load_state_dict(plain.state_dict())
    X, y = torch.randn(5, 3, dtype=F64), torch.randint(0, 2, (5,))
    n = sum(p.numel() for p in plain.parameters())
    v = torch.randn(n, dtype=F64)
    with pytest.raises((NotImplementedError, RuntimeError)):
        hvp(custom, CE, X, y, v, mode="fwd-rev")
    torch.testing.assert_close(hvp(custom, CE, X, y, v), hvp(plain, CE, X, y, v))
    V = torch.stack([v, -2 * v], dim=1)
    for mode in ("auto", "rev-rev"):  # the Hessian's default products need no forward mode
        op = HessianOperator(custom, CE, (X, y), cache=False, mode=mode)
        torch.testing.assert_close(op @ v, dense_hessian(plain, CE, X, y) @ v)
        torch.testing.assert_close(op @ V, dense_hessian(plain, CE, X, y) @ V)
    with pytest.raises((NotImplementedError, RuntimeError)):
        HessianOperator(custom, CE, (X, y), cache=False, mode="fwd-rev") @ V
    fwd = HessianOperator(plain, CE, (X, y), cache=False, mode="fwd-rev")
    torch.testing.assert_close(fwd @ V, dense_hessian(plain, CE, X, y) @ V)
    ggn = GGNOperator(custom, CE, (X, y))
    torch.testing.assert_close(ggn @ v, dense_ggn(plain, CE, X, y) @ v)


# --- float64 on request, snapshots -------------------------------------------------------
def test_float64_copy_leaves_user_model_untouched():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    X, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    op = HessianOperator(model, CE, (X, y), dtype=F64)
    assert op.dtype == F64 and next(model.parameters()).dtype == torch.float32
    ref = dense_hessian(model.double(), CE, X.double(), y)
    torch.testing.assert_close(op.to_dense(), ref)
    model.float()
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n])


def test_operator_is_a_snapshot_of_the_parameters():
    model, X, y = mlp_problem()
    ref = dense_hessian(model, CE, X, y)
    op = HessianOperator(model, CE, (X, y), cache=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    torch.testing.assert_close(op.to_dense(), ref)


# --- KAT 11: uneven last batch, loss and gradient ----------------------------------------
@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator, EmpiricalFisherOperator])
def test_uneven_last_batch_equals_concatenated_data(cls):
    model = tiny_mlp()
    X, y = torch.randn(69, 4, dtype=F64), torch.randint(0, 3, (69,))
    loader = DataLoader(TensorDataset(X, y), batch_size=32, shuffle=False)
    assert [len(b[0]) for b in loader] == [32, 32, 5]
    full = cls(model, CE, (X, y)).to_dense()
    torch.testing.assert_close(cls(model, CE, loader).to_dense(), full, rtol=1e-12, atol=1e-12)
    if cls is HessianOperator:
        torch.testing.assert_close(full, dense_hessian(model, CE, X, y))
        cached = cls(model, CE, loader, cache=True)
        torch.testing.assert_close(cached.to_dense(), full, rtol=1e-12, atol=1e-12)
        op = cls(model, CE, loader)
        _, theta = flat_params(model)
        torch.testing.assert_close(op.gradient(), dense_grad(model, CE, X, y, theta))
        with torch.no_grad():
            torch.testing.assert_close(op.loss(), CE(model(X), y))


# --- KAT 10: BatchNorm ---------------------------------------------------------------------
def test_train_mode_batchnorm_is_refused_eval_mode_works():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    model = model.double()
    X, y = torch.randn(10, 4, dtype=F64), torch.randint(0, 3, (10,))
    for cls in (HessianOperator, GGNOperator, EmpiricalFisherOperator):
        with pytest.raises(RuntimeError, match=r"BatchNorm in train mode.*model\.eval\(\)"):
            cls(model, CE, (X, y))
    assert model[1].training  # never switched silently
    model.eval()
    torch.testing.assert_close(HessianOperator(model, CE, (X, y)).to_dense(),
                               dense_hessian(model, CE, X, y))


# --- operator base and block products -------------------------------------------------------
def test_block_products_chunks_and_matvec_counter():
    model, X, y = mlp_problem()
    H = dense_hessian(model, CE, X, y)
    V = torch.randn(H.shape[0], 5, dtype=F64)
    for op in (HessianOperator(model, CE, (X, y), cache=False, chunk_size=2),
               HessianOperator(model, CE, (X, y), cache=True)):
        torch.testing.assert_close(op @ V, H @ V)
        torch.testing.assert_close(op @ V[:, 0], H @ V[:, 0])
        assert op.num_matvecs == 6
        op.reset_matvecs()
        assert op.num_matvecs == 0


def test_sandwich_and_subclassing():
    class Diag(LinearOperator):
        def __init__(self, d):
            super().__init__(d.shape[0], d.dtype)
            self.d = d

        def _matmat(self, V):
            return self.d[:, None] * V

    A = Diag(torch.tensor([1.0, -2.0, 3.0], dtype=F64))
    d = torch.tensor([2.0, 0.5, 1.0], dtype=F64)
    S = A.sandwich(d)
    torch.testing.assert_close(S.to_dense(), torch.diag(d) @ A.to_dense() @ torch.diag(d))
    assert A.num_matvecs == 6  # 3 for A.to_dense, 3 through the sandwich
    torch.testing.assert_close(A @ torch.ones(3), torch.tensor([1.0, -2.0, 3.0], dtype=F64))
    with pytest.raises(ValueError, match="shape"):
        A @ torch.ones(4, dtype=F64)
    vals, _ = lanczos(S, 1, generator=torch.Generator().manual_seed(0))
    assert vals.item() == pytest.approx(4.0)  # diag(4, -0.5, 3)


# --- single-vector reverse-over-reverse path and the cached gradient -----------------------
@pytest.mark.parametrize("names", [None, ["2.weight", "2.bias"], ["0.bias"]])
def test_single_vector_products_match_the_dense_block(names):
    model, X, y = mlp_problem()
    H = dense_hessian(model, CE, X, y, names)
    v = torch.randn(H.shape[0], dtype=F64)
    for op in (HessianOperator(model, CE, (X, y), params=names, cache=False),
               HessianOperator(model, CE, [(X[:5], y[:5]), (X[5:], y[5:])], params=names),
               HessianOperator(model, CE, (X, y), params=names, cache=True),
               HessianOperator(model, CE, [(X[:5], y[:5]), (X[5:], y[5:])], params=names,
                               mode="fwd-rev")):
        torch.testing.assert_close(op @ v, H @ v)
        V = torch.stack([v, 3 * v.flip(0)], dim=1)
        torch.testing.assert_close(op @ V, H @ V)
    torch.testing.assert_close(hvp(model, CE, X, y, v, names), H @ v)


def test_cached_operator_gradient_comes_from_its_graph():
    model, X, y = mlp_problem()
    _, theta = flat_params(model)
    op = HessianOperator(model, CE, (X, y))
    assert op.cache
    g = op.gradient()
    torch.testing.assert_close(g, dense_grad(model, CE, X, y, theta))
    g.zero_()  # a copy: the operator's stored gradient is unchanged
    torch.testing.assert_close(op.gradient(), dense_grad(model, CE, X, y, theta))


@pytest.mark.parametrize("threads", [1, 2])
def test_block_products_on_one_and_on_more_threads_match_the_dense_hessian(threads):
    """One thread: column-by-column double backward; more: vmap-ed forward-over-reverse."""
    model, X, y = mlp_problem()
    H = dense_hessian(model, CE, X, y)
    V = torch.randn(H.shape[0], 5, dtype=F64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for op in (HessianOperator(model, CE, (X, y)),
                   HessianOperator(model, CE, [(X[:5], y[:5]), (X[5:], y[5:])], chunk_size=2)):
            torch.testing.assert_close(op @ V, H @ V)
            torch.testing.assert_close(op @ V[:, 0], H @ V[:, 0])
    finally:
        torch.set_num_threads(before)
