"""torch.optim conventions (conventions.md §1) checked on every optimizer in CASES."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from gradkit.errors import UsageError
from gradkit.optim import available, create
from tests.optim.conformance import (
    CASES,
    IMPL_FLAGS,
    Case,
    TinyNet,
    flat_params,
    ill_conditioned_quadratic,
    make_optimizer,
    rosenbrock,
    signature_hyperparameters,
    train,
)

case_param = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])


def _case_paths():
    return [pytest.param(c, p, id=f"{c.id}-{p}") for c in CASES for p in c.paths]


def _dtype(path: str) -> torch.dtype:
    """float64 except on the fused path, which the battery runs in float32 only (one compile
    per kernel variant; float64 fused parity is in the per-method tests)."""
    return torch.float32 if path == "fused" else torch.float64


@case_param
def test_is_a_torch_optimizer_with_every_hyperparameter_in_defaults(case: Case):
    opt = make_optimizer(case, TinyNet().parameters())
    assert isinstance(opt, torch.optim.Optimizer)
    hyper = signature_hyperparameters(case)
    assert set(hyper) <= set(opt.defaults), set(hyper) - set(opt.defaults)
    for name in hyper:
        assert name in opt.param_groups[0]
    assert isinstance(create(case.registry_name, TinyNet().parameters(), **case.kwargs),
                      case.factory)
    assert case.registry_name in available()


def test_registry_unknown_name_lists_valid_names():
    with pytest.raises(UsageError, match="diffgrad"):
        create("no-such-optimizer", TinyNet().parameters())


@case_param
def test_every_flag_changes_the_trajectory_or_raises(case: Case):
    hyper = signature_hyperparameters(case)
    base = flat_params(train(case, 4)[0])
    for name, default in hyper.items():
        if name in IMPL_FLAGS:
            continue
        if isinstance(default, bool):
            value = not case.kwargs.get(name, default)
        else:
            assert name in case.alternatives, f"{case.id}: no alternative value for {name!r}"
            value = case.alternatives[name]
        try:
            other = flat_params(train(case, 4, **{name: value})[0])
        except (ValueError, RuntimeError, NotImplementedError):
            continue
        assert not torch.equal(base, other), f"{case.id}: {name}={value!r} had no effect"


@pytest.mark.parametrize(("case", "path"), _case_paths())
def test_paths_agree(case: Case, path: str):
    """loop, foreach and fused run the same algorithm (float32, 6 steps)."""
    ref = flat_params(train(case, 6, "loop", dtype=torch.float32)[0])
    got = flat_params(train(case, 6, path, dtype=torch.float32)[0])
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=2e-6)


@case_param
def test_fused_and_foreach_together_raise(case: Case):
    with pytest.raises(RuntimeError, match="fused"):
        case.factory(TinyNet().parameters(), **case.kwargs, fused=True, foreach=True)


@case_param
def test_invalid_hyperparameters_raise_value_error_naming_them(case: Case):
    for kwargs, match in case.invalid:
        with pytest.raises(ValueError, match=match):
            case.factory(TinyNet().parameters(), **{**case.kwargs, **kwargs})


@case_param
def test_lr_zero_is_allowed_and_leaves_params_unchanged(case: Case):
    before = flat_params(TinyNet(torch.float64))
    after = flat_params(train(case, 3, lr=0.0)[0])
    assert torch.equal(before, after)


@case_param
def test_maximize_mirrors_minimizing_the_negated_loss(case: Case):
    a, _ = train(case, 5, maximize=True)
    model = TinyNet(torch.float64)
    opt = make_optimizer(case, model.parameters())
    for t in range(5):
        opt.zero_grad()
        (-model.loss(t)).backward()
        opt.step()
    assert torch.equal(flat_params(a), flat_params(model))


@case_param
def test_step_never_mutates_grad(case: Case):
    model = TinyNet(torch.float64)
    opt = make_optimizer(case, model.parameters(), maximize=True)
    for t in range(3):
        opt.zero_grad()
        model.loss(t).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for p, g in zip(model.parameters(), grads):
            assert torch.equal(p.grad, g)


@case_param
def test_closure_runs_with_grad_enabled_and_loss_is_returned(case: Case):
    model = TinyNet(torch.float64)
    opt = make_optimizer(case, model.parameters())
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = model.loss(0)
        loss.backward()
        return loss

    before = flat_params(model)
    loss = opt.step(closure)
    assert calls == [True]
    assert torch.is_tensor(loss) and loss.item() == pytest.approx(
        TinyNet(torch.float64).loss(0).item())
    assert not torch.equal(before, flat_params(model))


@pytest.mark.parametrize(("case", "path"), _case_paths())
def test_grad_none_is_skipped_and_state_created_when_grad_appears(case: Case, path: str):
    model = TinyNet(_dtype(path))
    opt = make_optimizer(case, model.parameters(), path)
    frozen_before = model.mix.detach().clone()
    opt.zero_grad()
    model.loss(0).backward()
    model.mix.grad = None
    opt.step()
    assert torch.equal(model.mix, frozen_before)
    assert model.mix not in opt.state
    assert set(opt.state[model.weight]) == set(case.state_keys)
    opt.zero_grad()
    model.loss(1).backward()
    opt.step()
    assert set(opt.state[model.mix]) == set(case.state_keys)
    assert not torch.equal(model.mix, frozen_before)
    if "step" in case.state_keys:
        step = opt.state[model.mix]["step"]
        assert step.dtype == torch.float32 and step.device.type == "cpu" and step.ndim == 0
        assert step.item() == 1 and opt.state[model.weight]["step"].item() == 2


@case_param
def test_sparse_gradients_raise(case: Case):
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt = case.factory(emb.parameters(), **case.kwargs)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize(("case", "path"), _case_paths())
def test_state_dict_round_trip_is_bitwise(case: Case, path: str):
    dtype = _dtype(path)
    full, _ = train(case, 100, path, dtype=dtype)
    model, opt = train(case, 50, path, dtype=dtype)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = TinyNet(dtype)
    fresh.load_state_dict(saved["model"])
    fresh_opt = make_optimizer(case, fresh.parameters(), path)
    fresh_opt.load_state_dict(saved["opt"])
    resumed, _ = train(case, 50, path, model=fresh, opt=fresh_opt, start=50)
    assert torch.equal(flat_params(resumed), flat_params(full))


@case_param
def test_works_with_lr_scheduler(case: Case):
    model = TinyNet(torch.float64)
    opt = make_optimizer(case, model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    manual = TinyNet(torch.float64)
    manual_opt = make_optimizer(case, manual.parameters())
    for t in range(6):
        for m, o in ((model, opt), (manual, manual_opt)):
            o.zero_grad()
            m.loss(t).backward()
            o.step()
        sched.step()
        manual_opt.param_groups[0]["lr"] = case.kwargs["lr"] * 0.5 ** ((t + 1) // 2)
    assert opt.param_groups[0]["lr"] == pytest.approx(case.kwargs["lr"] / 8)
    assert torch.equal(flat_params(model), flat_params(manual))


@case_param
def test_param_groups_use_their_own_hyperparameters(case: Case):
    model = TinyNet(torch.float64)
    weights = [model.weight, model.mix]
    others = [model.bias, model.scale]
    opt = make_optimizer(case, [{"params": weights}, {"params": others, "lr": 0.0}])
    before = [p.detach().clone() for p in others]
    for t in range(2):
        opt.zero_grad()
        model.loss(t).backward()
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(others, before))
    assert not torch.equal(model.weight, TinyNet(torch.float64).weight)


@case_param
def test_deepcopy_repr_and_hooks(case: Case):
    model, opt = train(case, 3)
    twin_model = copy.deepcopy(model)
    twin_opt = make_optimizer(case, twin_model.parameters())
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    clone = copy.deepcopy(opt)
    assert clone.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    assert case.factory.__name__ in repr(opt)
    fired = []
    opt.register_step_pre_hook(lambda *_: fired.append("pre"))
    opt.register_step_post_hook(lambda *_: fired.append("post"))
    train(case, 2, model=model, opt=opt, start=3)
    train(case, 2, model=twin_model, opt=twin_opt, start=3)
    assert fired == ["pre", "post", "pre", "post"]
    assert torch.equal(flat_params(model), flat_params(twin_model))


@case_param
def test_converges_on_rosenbrock(case: Case):
    xy = torch.nn.Parameter(torch.tensor([-1.5, 2.0], dtype=torch.float64))
    opt = case.factory([xy], **case.smoke_kwargs)
    start = rosenbrock(xy).item()
    for _ in range(3000):
        opt.zero_grad()
        rosenbrock(xy).backward()
        opt.step()
    assert rosenbrock(xy).item() < 1e-2 * start
    assert torch.linalg.vector_norm(xy.detach() - 1.0) < 0.5


@case_param
def test_converges_on_ill_conditioned_quadratic(case: Case):
    w = torch.nn.Parameter(torch.ones(4, 5, dtype=torch.float64))
    opt = case.factory([w], **case.smoke_kwargs)
    start = ill_conditioned_quadratic(w).item()
    for _ in range(1000):
        opt.zero_grad()
        ill_conditioned_quadratic(w).backward()
        opt.step()
    assert ill_conditioned_quadratic(w).item() < 1e-3 * start
