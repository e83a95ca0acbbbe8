"""Loss reduction, bad input and the operators' mode choice (clear errors, no silent results)."""

import functools

import pytest
import torch
from torch import nn

from gradkit.curvature import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    MatrixOperator,
    hutchinson_trace,
    hutchpp_trace,
    hvp,
)
from gradkit.curvature.hvp import hvp_dict
from tests.curvature._helpers import dense_hessian, tiny_mlp
from tests.curvature.test_model_operators import CubeNet

F64 = torch.float64
CE = nn.functional.cross_entropy


def five():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 4, generator=g, dtype=F64), torch.randint(0, 3, (5,), generator=g)


# --- sum-reduced losses: the result does not depend on the batching ----------------------
@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator, EmpiricalFisherOperator])
@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(reduction="sum"),
                                     functools.partial(CE, reduction="sum")],
                         ids=["module", "partial"])
def test_sum_reduction_is_n_times_the_mean_for_any_batching(cls, loss_fn):
    model = tiny_mlp()
    X, y = five()
    one_batch = cls(model, loss_fn, [(X, y)]).to_dense()
    four_plus_one = cls(model, loss_fn, [(X[:4], y[:4]), (X[4:], y[4:])]).to_dense()
    torch.testing.assert_close(four_plus_one, one_batch, rtol=1e-12, atol=1e-12)
    mean = cls(model, CE, [(X[:4], y[:4]), (X[4:], y[4:])]).to_dense()
    torch.testing.assert_close(one_batch, 5 * mean)
    if cls is HessianOperator:
        torch.testing.assert_close(one_batch, dense_hessian(model, loss_fn, X, y))
        op = cls(model, loss_fn, [(X[:4], y[:4]), (X[4:], y[4:])])
        with torch.no_grad():
            torch.testing.assert_close(op.loss(), loss_fn(model(X), y))


def test_plain_function_summing_over_examples_is_refused_unless_declared():
    model = tiny_mlp()
    X, y = five()
    batches = [(X[:4], y[:4]), (X[4:], y[4:])]

    def sum_ce(out, target):
        return CE(out, target, reduction="sum")

    with pytest.raises(ValueError, match="reduction='sum'"):
        HessianOperator(model, sum_ce, batches)
    declared = HessianOperator(model, sum_ce, batches, reduction="sum").to_dense()
    torch.testing.assert_close(declared, dense_hessian(model, sum_ce, X, y))
    HessianOperator(model, sum_ce, (X, y))  # one batch: the reduction does not matter
    HessianOperator(model, lambda o, t: CE(o, t), batches)  # a mean: accepted


def test_reduction_none_and_contradicting_reduction_are_refused():
    model = tiny_mlp()
    X, y = five()
    with pytest.raises(ValueError, match="reduction='mean' or 'sum'"):
        HessianOperator(model, nn.CrossEntropyLoss(reduction="none"), (X, y))
    with pytest.raises(ValueError, match="contradicts"):
        HessianOperator(model, nn.CrossEntropyLoss(), (X, y), reduction="sum")
    with pytest.raises(ValueError, match="Invalid reduction"):
        GGNOperator(model, CE, (X, y), reduction="max")


# --- bad input: clear errors ----------------------------------------------------------------
def test_one_shot_generator_is_refused_with_or_without_the_determinism_check():
    X, y = five()
    for check in (True, False):
        with pytest.raises(TypeError, match="one-shot iterator"):
            HessianOperator(tiny_mlp(), CE, ((X[i:i + 1], y[i:i + 1]) for i in range(5)),
                            check_deterministic=check)


def test_a_pass_with_fewer_examples_raises_instead_of_a_partial_sum():
    X, y = five()

    class Shrinking:  # re-iterable in form; after full_passes it drops a batch
        def __init__(self, full_passes):
            self.passes, self.full_passes = 0, full_passes

        def __iter__(self):
            self.passes += 1
            batches = [(X[:3], y[:3]), (X[3:], y[3:])]
            return iter(batches if self.passes <= self.full_passes else batches[:1])

    op = HessianOperator(tiny_mlp(), CE, Shrinking(1), check_deterministic=False)
    with pytest.raises(RuntimeError, match="gave 3 examples, the first pass gave 5"):
        op @ torch.ones(op.shape[0], dtype=F64)


def test_nan_inputs_and_nan_parameters_are_named_as_such():
    X, y = five()
    X[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite inputs"):
        HessianOperator(tiny_mlp(), CE, [(X[:3], y[:3]), (X[3:], y[3:])])
    model = tiny_mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        GGNOperator(model, CE, five())


def test_non_scalar_loss_gets_a_clear_message():
    model = tiny_mlp()
    X, y = five()

    def per_example(out, target):
        return CE(out, target, reduction="none")

    with pytest.raises(ValueError, match=r"must return a scalar.*\(5,\)"):
        HessianOperator(model, per_example, (X, y))
    with pytest.raises(ValueError, match="must return a scalar"):
        hvp(model, per_example, X, y, torch.ones(sum(p.numel() for p in model.parameters()),
                                                dtype=F64))


def test_all_frozen_parameters_and_empty_params_are_refused_clearly():
    model = tiny_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        HessianOperator(model, CE, five())
    with pytest.raises(ValueError, match="params is empty"):
        GGNOperator(tiny_mlp(), CE, five(), params=[])
    HessianOperator(model, CE, five(), params=["2.bias"])  # explicit names still work


def test_trace_budgets_share_one_name_old_names_warn():
    A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=F64)
    op = MatrixOperator(A)
    g = torch.Generator
    assert hutchinson_trace(op, num_matvecs=6, generator=g().manual_seed(0)).num_matvecs == 6
    assert hutchpp_trace(op, num_matvecs=6, generator=g().manual_seed(0)).num_matvecs == 6
    with pytest.warns(FutureWarning, match="n_probes"):
        old = hutchinson_trace(op, n_probes=6, generator=g().manual_seed(0))
    assert old.estimate == hutchinson_trace(op, 6, generator=g().manual_seed(0)).estimate
    with pytest.warns(FutureWarning, match="n_matvecs"):
        old = hutchpp_trace(op, n_matvecs=6, generator=g().manual_seed(0))
    assert old.estimate == hutchpp_trace(op, 6, generator=g().manual_seed(0)).estimate
    with pytest.raises(ValueError, match="Invalid num_matvecs value: 0"):
        hutchinson_trace(op, 0)
    with pytest.raises(TypeError, match="both"):
        hutchpp_trace(op, 6, n_matvecs=6)


# --- operators: the mode choice does not rewrite the user's setting ----------------------------
def test_forward_mode_fallback_keeps_the_mode_and_genuine_errors_surface():
    plain, custom = CubeNet(False), CubeNet(True)
    custom.load_state_dict(plain.state_dict())
    X, y = torch.randn(5, 3, dtype=F64), torch.randint(0, 2, (5,))
    op = GGNOperator(custom, CE, (X, y))
    ref = GGNOperator(plain, CE, (X, y))
    v = torch.randn(op.shape[0], dtype=F64)
    torch.testing.assert_close(op @ v, ref @ v)  # no jvp rule for Cube: reverse mode
    assert op.mode == "auto"

    failing = {"now": False}

    def fails_in_products(out, target):
        if failing["now"]:
            raise RuntimeError("genuine failure")
        return CE(out, target)

    broken = GGNOperator(plain, fails_in_products, (X, y))
    failing["now"] = True
    with pytest.raises(RuntimeError, match="genuine failure"):
        broken @ v


def test_hvp_dict_returns_only_the_product():
    model = tiny_mlp()
    X, y = five()
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents = {n: torch.ones_like(p) for n, p in params.items()}

    def loss(p):
        return CE(torch.func.functional_call(model, p, (X,)), y)

    out = hvp_dict(loss, params, tangents)
    assert isinstance(out, dict) and set(out) == set(params)
