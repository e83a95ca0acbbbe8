"""torch.optim conventions (conventions.md §1) checked on every optimizer in CASES.

Each test is parameterised by :func:`cases` with the name of its check, so a case's declared
``not_applicable`` reason shows as a skip carrying that reason and a declared ``xfail`` runs as
a strict xfail (it must keep failing until the defect is fixed).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from gradkit.errors import UsageError
from gradkit.optim import available, create
from tests.optim.conformance import (
    CASES,
    CHECKS,
    Case,
    TinyNet,
    With,
    flat_params,
    ill_conditioned_quadratic,
    make_for,
    make_optimizer,
    param_groups,
    rosenbrock,
    signature_hyperparameters,
    take_step,
    train,
)


def _marks(case: Case, check: str) -> list:
    if check in case.not_applicable:
        return [pytest.mark.skip(reason=f"{case.id}: {case.not_applicable[check]}")]
    if check in case.xfail:
        return [pytest.mark.xfail(strict=True, reason=f"{case.id}: {case.xfail[check]}")]
    return []


def cases(check: str, *, paths: bool = False) -> pytest.MarkDecorator:
    """Parametrize over CASES (and their paths) for ``check``, with the declared marks."""
    assert check in CHECKS, check
    if paths:
        params = [pytest.param(c, p, id=f"{c.id}-{p}", marks=_marks(c, check))
                  for c in CASES for p in c.paths]
        return pytest.mark.parametrize(("case", "path"), params)
    params = [pytest.param(c, id=c.id, marks=_marks(c, check)) for c in CASES]
    return pytest.mark.parametrize("case", params)


def _dtype(path: str) -> torch.dtype:
    """float64 except on the fused path, which the battery runs in float32 only (one compile
    per kernel variant; float64 fused parity is in the per-method tests)."""
    return torch.float32 if path == "fused" else torch.float64


def _zero_lr(case: Case) -> dict:
    return dict.fromkeys(case.lr_keys, 0.0)


@cases("hyperparameters_in_defaults")
def test_is_a_torch_optimizer_with_every_hyperparameter_in_defaults(case: Case):
    opt = make_for(case, TinyNet())
    assert isinstance(opt, torch.optim.Optimizer)
    hyper = set(signature_hyperparameters(case)) - set(case.not_in_defaults)
    assert hyper <= set(opt.defaults), hyper - set(opt.defaults)
    for name in hyper:
        assert all(name in group for group in opt.param_groups), name
    for name in case.not_in_defaults:  # a declared exception must be real
        assert name in signature_hyperparameters(case) and name not in opt.defaults
    assert isinstance(create(case.registry_name, param_groups(case, TinyNet()), **case.kwargs),
                      case.factory)
    assert case.registry_name in available()


def test_registry_unknown_name_lists_valid_names():
    with pytest.raises(UsageError, match="diffgrad"):
        create("no-such-optimizer", TinyNet().parameters())


def test_declarations_are_consistent():
    """Closure-only cases refuse ``step()``; declared paths are real paths."""
    for case in CASES:
        assert set(case.paths) <= {"loop", "foreach", "fused"}
        assert case.tensor_lr_refused <= set(case.paths)
        opt = make_for(case, TinyNet())
        if case.needs_closure:
            with pytest.raises(RuntimeError, match="closure"):
                opt.step()


@cases("flags")
def test_every_flag_changes_the_trajectory_or_raises(case: Case):
    hyper = signature_hyperparameters(case)
    plain = flat_params(train(case, 4)[0])
    for name, default in hyper.items():
        if name in case.impl_flags:
            continue
        if isinstance(default, bool):
            value, context = not case.kwargs.get(name, default), {}
        else:
            assert name in case.alternatives, f"{case.id}: no alternative value for {name!r}"
            value, context = case.alternatives[name], {}
            if isinstance(value, With):
                value, context = value.value, value.context
        base = flat_params(train(case, 4, **context)[0]) if context else plain
        try:
            other = flat_params(train(case, 4, **{**context, name: value})[0])
        except (ValueError, RuntimeError, NotImplementedError):
            continue
        assert not torch.equal(base, other), f"{case.id}: {name}={value!r} had no effect"


@cases("paths", paths=True)
def test_paths_agree(case: Case, path: str):
    """loop, foreach and fused run the same algorithm (float32, 6 steps)."""
    ref = flat_params(train(case, 6, "loop", dtype=torch.float32)[0])
    got = flat_params(train(case, 6, path, dtype=torch.float32)[0])
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=2e-6)


@cases("invalid")
def test_invalid_arguments_raise_clearly(case: Case):
    for kwargs, match in case.invalid:
        with pytest.raises(ValueError, match=match):
            case.factory(param_groups(case, TinyNet()), **{**case.kwargs, **kwargs})
    # fused and foreach together: torch's RuntimeError, or no `fused` argument at all
    with pytest.raises((RuntimeError, TypeError), match="fused"):
        case.factory(param_groups(case, TinyNet()), **case.kwargs, fused=True, foreach=True)


@cases("torch_messages")
def test_invalid_values_get_torchs_own_message(case: Case):
    """``lr`` / ``eps`` / ``weight_decay`` errors read exactly as ``torch.optim.Adam``'s."""
    checked = 0
    for name, value in (("lr", -1.0), ("eps", -0.1), ("weight_decay", -1.0)):
        if name not in signature_hyperparameters(case) and name not in case.kwargs:
            continue
        with pytest.raises(ValueError) as torch_error:
            torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], **{name: value})
        with pytest.raises(ValueError) as ours:
            case.factory(param_groups(case, TinyNet()), **{**case.kwargs, name: value})
        assert str(ours.value) == str(torch_error.value)
        checked += 1
    assert checked >= 1


@cases("lr_zero")
def test_lr_zero_is_allowed_and_leaves_params_unchanged(case: Case):
    before = flat_params(TinyNet(torch.float64))
    after = flat_params(train(case, 3 + case.warmup, **_zero_lr(case))[0])
    assert torch.equal(before, after)


@cases("maximize")
def test_maximize_mirrors_minimizing_the_negated_loss(case: Case):
    steps = 4 + case.warmup
    a, _ = train(case, steps, maximize=True)
    model = TinyNet(torch.float64)
    opt = make_for(case, model)
    for t in range(steps):
        take_step(case, model, opt, t, sign=-1.0)
    assert torch.equal(flat_params(a), flat_params(model))
    assert not torch.equal(flat_params(a), flat_params(TinyNet(torch.float64)))


@cases("grad_untouched")
def test_step_never_mutates_grad(case: Case):
    model = TinyNet(torch.float64)
    opt = make_for(case, model, maximize=True)
    for t in range(2 + case.warmup):
        take_step(case, model, opt, t)
        grads = [p.grad.clone() for p in model.parameters()]
        # the gradients the last backward left are the ones step() used; step(None) again
        # (a closure-only optimizer has no such form: its first_step/second_step are checked)
        if case.needs_closure:
            opt.first_step()
            opt.second_step()
        else:
            opt.step()
        for p, g in zip(model.parameters(), grads):
            assert torch.equal(p.grad, g)


@cases("closure")
def test_closure_runs_with_grad_enabled_and_loss_is_returned(case: Case):
    model = TinyNet(torch.float64)
    opt = make_for(case, model)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = model.loss(0)
        loss.backward()
        return loss

    before = flat_params(model)
    losses = [opt.step(closure) for _ in range(case.warmup)]
    assert calls and all(calls)
    assert len(calls) == case.warmup * (2 if case.needs_closure else 1)
    assert torch.is_tensor(losses[0]) and losses[0].item() == pytest.approx(
        TinyNet(torch.float64).loss(0).item())
    assert not torch.equal(before, flat_params(model))


@cases("grad_none", paths=True)
def test_grad_none_is_skipped_and_state_created_when_grad_appears(case: Case, path: str):
    model = TinyNet(_dtype(path))
    opt = make_for(case, model, path)
    frozen_before = model.mix.detach().clone()

    def drop_mix(m: TinyNet) -> None:
        m.mix.grad = None

    take_step(case, model, opt, 0, grad_hook=drop_mix)
    assert torch.equal(model.mix, frozen_before)
    assert model.mix not in opt.state
    assert set(opt.state[model.weight]) == set(case.state_keys)
    for t in range(1, 1 + case.warmup):
        take_step(case, model, opt, t)
    assert set(opt.state[model.mix]) == set(case.state_keys)
    assert not torch.equal(model.mix, frozen_before)
    for p, count in ((model.mix, case.warmup), (model.weight, case.warmup + 1)):
        if "step" in opt.state[p]:
            step = opt.state[p]["step"]
            assert step.dtype == torch.float32 and step.device.type == "cpu" and step.ndim == 0
            assert step.item() == count


@cases("sparse")
def test_sparse_gradients_raise(case: Case):
    emb = torch.nn.Embedding(5, 3, sparse=True)
    groups = param_groups(case, TinyNet())  # the case's group layout, an embedding in front
    groups[0]["params"] = [emb.weight]
    opt = case.factory(groups, **case.kwargs)

    def closure():
        opt.zero_grad()
        loss = emb(torch.tensor([1, 2])).sum()
        loss.backward()
        return loss

    closure()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(closure) if case.needs_closure else opt.step()


def _resume(case: Case, path: str, *, named: bool = False, edit=None) -> None:
    """100 steps == 50 steps, save (``edit`` may rewrite the saved dict), load into a fresh
    model and optimizer built with other learning rates, 50 steps; bitwise."""
    dtype = _dtype(path)
    full, _ = train(case, 100, path, dtype=dtype, named=named)
    model, opt = train(case, 50, path, dtype=dtype, named=named)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    if edit is not None:
        edit(saved["opt"])
    fresh = TinyNet(dtype)
    fresh.load_state_dict(saved["model"])
    other_lr = {k: 0.5 for k in case.lr_keys}  # loading must restore the saved values
    fresh_opt = make_for(case, fresh, path, named=named, **other_lr)
    fresh_opt.load_state_dict(saved["opt"])
    resumed, _ = train(case, 50, path, model=fresh, opt=fresh_opt, start=50)
    assert torch.equal(flat_params(resumed), flat_params(full))


@cases("round_trip", paths=True)
def test_state_dict_round_trip_is_bitwise(case: Case, path: str):
    _resume(case, path)


@cases("python_step")
def test_state_dict_with_python_number_step_loads_and_resumes(case: Case):
    """Reference packages store ``step`` as a Python number; loading converts it (as torch's
    ``__setstate__`` does) and training continues exactly."""
    _, opt = train(case, case.warmup)
    if not any("step" in state for state in opt.state.values()):
        pytest.skip(f"{case.id}: its state has no 'step' (state keys "
                    f"{sorted({k for state in opt.state.values() for k in state})})")
    seen = []

    def to_python_numbers(saved: dict) -> None:
        for state in saved["state"].values():
            if "step" in state:
                state["step"] = int(state["step"].item())
                seen.append(state["step"])

    _resume(case, "loop", edit=to_python_numbers)
    assert seen and all(s == 50 for s in seen), seen


@cases("named_params")
def test_named_parameters_are_accepted_like_torch(case: Case):
    """``model.named_parameters()`` (flat, and as groups): same steps, names in state_dict."""
    model, opt = train(case, 3 + case.warmup, named=True)
    plain, _ = train(case, 3 + case.warmup)
    assert torch.equal(flat_params(model), flat_params(plain))
    names = [n for g in opt.state_dict()["param_groups"] for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    if case.groups is None:  # the flat form: one group
        flat = case.factory(TinyNet().named_parameters(), **case.kwargs)
        assert flat.param_groups[0]["param_names"] == ["weight", "bias", "mix", "scale"]
    _resume(case, "loop", named=True)


@cases("group_lr_only")
def test_per_group_lr_without_a_top_level_lr(case: Case):
    lrs = (case.kwargs["lr"], case.kwargs["lr"] / 2)
    model_a, model_b = TinyNet(torch.float64), TinyNet(torch.float64)
    groups_a = [{**g, "lr": lr} for g, lr in zip(param_groups(case, model_a), lrs)]
    groups_b = [{**g, "lr": lr} for g, lr in zip(param_groups(case, model_b), lrs)]
    kwargs = {k: v for k, v in case.kwargs.items() if k != "lr"}
    opt_a = case.factory(groups_a, **kwargs)
    opt_b = case.factory(groups_b, **case.kwargs)  # the group values win over the top level
    assert [g["lr"] for g in opt_a.param_groups] == list(lrs)
    for t in range(2 + case.warmup):
        take_step(case, model_a, opt_a, t)
        take_step(case, model_b, opt_b, t)
    assert torch.equal(flat_params(model_a), flat_params(model_b))
    assert not torch.equal(flat_params(model_a), flat_params(TinyNet(torch.float64)))


@cases("tensor_lr", paths=True)
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0d", "1", "1x1"])
def test_tensor_lr_steps_like_the_float(case: Case, path: str, shape: tuple):
    """torch accepts a 1-element Tensor lr (squeezed in step); with foreach=True and
    capturable=False it refuses it in the constructor, and so must a case declaring that."""
    lr = torch.full(shape, case.kwargs["lr"], dtype=torch.float64)
    if path in case.tensor_lr_refused:
        with pytest.raises(ValueError, match="lr as a Tensor is not supported"):
            make_for(case, TinyNet(), path, lr=lr)
        return
    with pytest.raises(ValueError, match="lr"):
        make_for(case, TinyNet(), path, lr=torch.full((2,), 0.1))
    dtype = _dtype(path)
    got, _ = train(case, 3 + case.warmup, path, dtype=dtype, lr=lr)
    want, _ = train(case, 3 + case.warmup, path, dtype=dtype)
    assert all(p.shape == q.shape for p, q in zip(got.parameters(), want.parameters()))
    torch.testing.assert_close(flat_params(got), flat_params(want), rtol=1e-6, atol=1e-12)


@cases("scheduler")
def test_works_with_lr_scheduler(case: Case):
    model = TinyNet(torch.float64)
    opt = make_for(case, model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    manual = TinyNet(torch.float64)
    manual_opt = make_for(case, manual)
    lr0 = [g["lr"] for g in opt.param_groups]
    for t in range(6):
        take_step(case, model, opt, t)
        take_step(case, manual, manual_opt, t)
        sched.step()
        for group, lr in zip(manual_opt.param_groups, lr0):
            group["lr"] = lr * 0.5 ** ((t + 1) // 2)
    assert opt.param_groups[0]["lr"] == pytest.approx(case.kwargs["lr"] / 8)
    assert torch.equal(flat_params(model), flat_params(manual))


@cases("group_hyperparameters")
def test_param_groups_use_their_own_hyperparameters(case: Case):
    model = TinyNet(torch.float64)
    weights, others = param_groups(case, model)
    others = {**others, "lr": 0.0}
    opt = make_optimizer(case, [weights, others])
    before = [p.detach().clone() for p in others["params"]]
    for t in range(1 + case.warmup):
        take_step(case, model, opt, t)
    assert all(torch.equal(p, b) for p, b in zip(others["params"], before))
    assert not torch.equal(model.weight, TinyNet(torch.float64).weight)


@cases("deepcopy_repr_hooks")
def test_deepcopy_repr_and_hooks(case: Case):
    model, opt = train(case, 3)
    twin_model = copy.deepcopy(model)
    twin_opt = make_for(case, twin_model)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    clone = copy.deepcopy(opt)
    assert clone.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    assert type(clone) is type(opt)
    assert opt.defaults.items() <= clone.defaults.items()  # torch adds differentiable=False
    assert case.factory.__name__ in repr(opt)
    fired = []
    opt.register_step_pre_hook(lambda *_: fired.append("pre"))
    opt.register_step_post_hook(lambda *_: fired.append("post"))
    train(case, 2, model=model, opt=opt, start=3)
    train(case, 2, model=twin_model, opt=twin_opt, start=3)
    assert fired == ["pre", "post", "pre", "post"]
    assert torch.equal(flat_params(model), flat_params(twin_model))


@cases("setstate_defaults")
def test_loading_a_state_dict_without_flags_restores_their_defaults(case: Case):
    """A checkpoint from before a flag existed lacks its key in ``param_groups``: loading
    fills in the default (torch's ``__setstate__`` + ``setdefault``) and training resumes."""
    flags = [n for n, d in signature_hyperparameters(case).items()
             if (d is None or isinstance(d, bool)) and n not in case.kwargs]
    assert flags, case.id

    def drop_flags(saved: dict) -> None:
        for group in saved["param_groups"]:
            for name in flags:
                group.pop(name, None)

    model, opt = train(case, 2)
    saved = copy.deepcopy(opt.state_dict())
    drop_flags(saved)
    fresh = make_for(case, copy.deepcopy(model))
    fresh.load_state_dict(saved)
    for group in fresh.param_groups:
        for name in flags:
            assert name in group, f"{case.id}: {name!r} not restored after loading"
    _resume(case, "loop", edit=drop_flags)


@cases("rosenbrock")
def test_converges_on_rosenbrock(case: Case):
    xy = torch.nn.Parameter(torch.tensor([-1.5, 2.0], dtype=torch.float64))
    opt = case.factory([xy], **case.smoke_kwargs)
    start = rosenbrock(xy).item()

    def closure():
        opt.zero_grad()
        loss = rosenbrock(xy)
        loss.backward()
        return loss

    for _ in range(3000 * case.updates_every):
        opt.step(closure)
    assert rosenbrock(xy).item() < 1e-2 * start
    assert torch.linalg.vector_norm(xy.detach() - 1.0) < 0.5


@cases("quadratic")
def test_converges_on_ill_conditioned_quadratic(case: Case):
    w = torch.nn.Parameter(torch.ones(4, 5, dtype=torch.float64))
    opt = case.factory([w], **case.smoke_kwargs)
    start = ill_conditioned_quadratic(w).item()

    def closure():
        opt.zero_grad()
        loss = ill_conditioned_quadratic(w)
        loss.backward()
        return loss

    for _ in range(1000 * case.updates_every):
        opt.step(closure)
    assert ill_conditioned_quadratic(w).item() < 1e-3 * start

