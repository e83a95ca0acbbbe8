"""The Monitor never changes the trajectory; schedules; per-example gradients in context."""

import copy
import warnings

import pytest
import torch
from torch import nn

from gradkit.instruments import (
    Coherence,
    GradNorm,
    Instrument,
    LogitStats,
    Loss,
    Monitor,
    NeuralCollapse,
    NoiseScale,
    OpposingSignals,
    UpdateSize,
    coherence,
    default_instruments,
    noise_scale_per_example,
)

ce = nn.functional.cross_entropy


def _net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Dropout(0.2),
                         nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3))


def _data(n=24):
    gen = torch.Generator().manual_seed(5)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _every_instrument(opt):
    from gradkit.instruments import GradientTests

    instruments = [*default_instruments(opt, classifier="6"), GradientTests()]
    for ins in instruments:
        ins.start = 0  # the default Hessian instruments start at step 1000
    return instruments


def _train(make_opt, steps, monitor_kwargs=None, form="with"):
    """Train with Dropout (consumes the RNG) and BatchNorm (updates buffers)."""
    model = _net()
    opt = make_opt(model.parameters())
    x, y = _data()
    mon = None
    if monitor_kwargs is not None:
        mon = Monitor(model, ce, opt, instruments=_every_instrument(opt), every=1,
                      **monitor_kwargs)
    torch.manual_seed(123)
    for _ in range(steps):
        opt.zero_grad()
        loss = ce(model(x), y)
        loss.backward()
        if mon is None:
            opt.step()
            continue
        grads = [p.grad.clone() for p in model.parameters()]
        rng = torch.get_rng_state()
        handle = mon.step((x, y), loss=loss)
        assert torch.equal(torch.get_rng_state(), rng)
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
        assert model.training and all(m.training for m in model.modules())
        if form == "with":
            with handle:
                opt.step()
        else:
            opt.step()
    if mon is not None:
        mon.close()
    return model, opt, torch.get_rng_state(), mon


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=0.01),
])
@pytest.mark.parametrize("form", ["with", "plain"])
def test_monitor_leaves_the_trajectory_bitwise_identical(make_opt, form, tmp_path):
    ref_model, ref_opt, ref_rng, _ = _train(make_opt, 5)
    model, opt, rng, mon = _train(make_opt, 5, {"log_dir": tmp_path}, form=form)
    assert torch.equal(rng, ref_rng)
    for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()):
        assert torch.equal(a, b)  # parameters and BatchNorm buffers
    for sa, sb in zip(opt.state.values(), ref_opt.state.values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k])
    keys = set().union(*mon.history)
    for key in ("loss", "grad_norm", "update_ratio", "sharpness", "hessian_trace",
                "m_coherence", "noise_scale", "grad_snr", "nc1", "opposing_up_index",
                "softmax_collapse", "nlm_alignment", "max_abs_logit", "norm_test"):
        assert key in keys, key
    if isinstance(opt, torch.optim.Adam):
        assert "precond_sharpness" in keys
    n_update = sum("update_size" in r for r in mon.history)
    assert n_update == (5 if form == "with" else 4)  # plain: the last one is never closed


def test_loop_fallback_randomness_never_reaches_the_global_rng():
    class Noisy(nn.Module):  # a random op vmap refuses under randomness="error"
        def forward(self, x):
            return x + 0.01 * torch.randn_like(x)

    model = nn.Sequential(nn.Linear(4, 5), Noisy(), nn.Linear(5, 2))
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    mon = Monitor(model, ce, instruments=[Coherence(every=1)], eval_mode=False)
    rng = torch.get_rng_state()
    with pytest.warns(RuntimeWarning, match="falling back to a loop"):
        mon.step((x, y))
    mon.flush()
    assert torch.equal(torch.get_rng_state(), rng)
    assert "m_coherence" in mon.history[0]


def _tanh_net_and_batch(n):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    return model, torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))


def _loop_grads(model, x, y):
    """Brute-force per-example gradients: one autograd call per example (Cockpit's pattern)."""
    rows = []
    for i in range(x.shape[0]):
        g = torch.autograd.grad(ce(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters()))
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows)


def test_monitor_per_example_statistics_match_a_python_loop():
    model, x, y = _tanh_net_and_batch(10)
    flat = _loop_grads(model, x, y)
    mon = Monitor(model, ce, instruments=[Coherence(every=1), NoiseScale(every=1, beta=0.0)],
                  chunk_size=3)
    mon.step((x, y))
    mon.flush()
    rec = mon.history[0]
    assert rec["m_coherence"] == pytest.approx(coherence(flat).m_coherence, rel=1e-10)
    assert rec["noise_scale_raw"] == pytest.approx(noise_scale_per_example(flat).b_simple,
                                                   rel=1e-10)
    # the flat per-example mean is the batch gradient
    full = torch.autograd.grad(ce(model(x), y), list(model.parameters()))
    torch.testing.assert_close(flat.mean(0), torch.cat([t.reshape(-1) for t in full]))


def test_train_mode_batchnorm_needs_eval_mode_for_per_example_gradients():
    model = _net()
    x, y = _data()
    ok = Monitor(model, ce, instruments=[Coherence(every=1)])  # eval_mode=True by default
    ok.step((x, y))
    ok.flush()
    assert "m_coherence" in ok.history[0]
    bad = Monitor(model, ce, instruments=[Coherence(every=1)], eval_mode=False)
    with pytest.raises(RuntimeError, match="BatchNorm in train mode"):
        bad.step((x, y))
    assert model.training  # restored even when an instrument fails


def test_two_batch_noise_scale_instrument_matches_chunk_formula():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    mon = Monitor(model, ce, instruments=[NoiseScale(every=1, method="two_batch", n_chunks=3,
                                                     beta=0.0)])
    mon.step((x, y))
    mon.flush()
    chunks = []
    for sl in (slice(0, 4), slice(4, 8), slice(8, 12)):
        g = torch.autograd.grad(ce(model(x[sl]), y[sl]), list(model.parameters()))
        chunks.append(torch.cat([t.reshape(-1) for t in g]))
    small_sq = sum(float(c @ c) for c in chunks) / 3
    big = sum(chunks) / 3
    trace = (small_sq - float(big @ big)) / (1 / 4 - 1 / 12)
    grad_sq = (12 * float(big @ big) - 4 * small_sq) / 8
    assert mon.history[0]["noise_scale_raw"] == pytest.approx(trace / grad_sq, rel=1e-10)


def test_schedules_and_every_overrides():
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    mon = Monitor(model, ce, instruments=[Loss(every=1), GradNorm(every=3, start=1),
                                          LogitStats(every=2)], every={"logits": 4})
    for _ in range(9):
        model.zero_grad()
        loss = ce(model(x), y)
        loss.backward()
        mon.step((x, y), loss=loss)
    mon.flush()
    assert mon.series("loss")[0] == list(range(9))
    assert mon.series("grad_norm")[0] == [1, 4, 7]
    assert mon.series("max_abs_logit")[0] == [0, 4, 8]
    assert mon.series("logit_growth")[0] == [4, 8]
    assert Monitor(model, ce, instruments=[Loss(every=5)], every=2).instruments[0].every == 2
    with pytest.raises(ValueError, match="unknown instrument"):
        Monitor(model, ce, instruments=[Loss()], every={"nope": 2})
    with pytest.raises(ValueError, match="unique"):
        Monitor(model, ce, instruments=[Loss(), Loss()])
    with pytest.raises(ValueError, match="every"):
        Loss(every=0)


def test_grad_is_computed_without_touching_p_grad_when_absent():
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    mon = Monitor(model, ce, instruments=[GradNorm(every=1)])
    mon.step((x, y))
    mon.flush()
    assert all(p.grad is None for p in model.parameters())
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(ce(model(x), y),
                                                                 list(model.parameters()))])
    assert mon.history[0]["grad_norm"] == pytest.approx(float(want.norm()), rel=1e-6)


def test_logit_stats_use_the_captured_training_forward():
    calls = []

    class Counting(nn.Linear):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    model = Counting(3, 2)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    mon = Monitor(model, ce, instruments=[LogitStats(every=1)], capture_outputs=True)
    out = model(x)
    mon.step((x, y))
    assert len(calls) == 1  # no extra forward
    mon.step((x.clone(), y))  # different inputs: a fresh forward
    assert len(calls) == 2
    mon.flush()
    assert mon.history[0]["max_abs_logit"] == pytest.approx(float(out.detach().abs().max()))


def test_update_size_and_opposing_signals_in_plain_form_span_consecutive_calls():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    ids = torch.arange(50, 58)
    mon = Monitor(model, ce, opt, instruments=[UpdateSize(every=1),
                                               OpposingSignals(every=1, k=2)])
    before = copy.deepcopy(model)
    opt.zero_grad()
    ce(model(x), y).backward()
    mon.step((x, y, ids))
    opt.step()
    mon.step((x, y, ids))  # completes step 0
    with torch.no_grad():
        delta = torch.cat([(a - b).reshape(-1) for a, b in zip(model.parameters(),
                                                               before.parameters())])
    rec = mon.history[0]
    assert rec["update_size"] == pytest.approx(float(delta.norm()), rel=1e-6)
    assert set(rec["opposing_up_index"] + rec["opposing_down_index"]) <= set(ids.tolist())


def test_instrument_base_and_neural_collapse_errors():
    with pytest.raises(NotImplementedError):
        Instrument().measure(None)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    mon = Monitor(model, ce, instruments=[NeuralCollapse("1", every=1)])
    with pytest.raises(ValueError, match=r"nn\.Linear"):
        mon.step((torch.randn(4, 3), torch.tensor([0, 1, 0, 1])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = Monitor(model, ce, instruments=[NeuralCollapse("2", every=1)])
        ok.step((torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1])))
        ok.flush()
    assert "nc1" in ok.history[0]


def test_gradient_tests_instrument_matches_brute_force_autograd():
    from gradkit.instruments import GradientTests

    model, x, y = _tanh_net_and_batch(9)
    g = _loop_grads(model, x, y)
    mean = g.mean(0)
    b, msq = 9, float(mean @ mean)
    var_trace = float(g.var(0, unbiased=True).sum())
    dots = g @ mean
    ortho = g - (dots / msq)[:, None] * mean
    want = {"norm_test": (var_trace / (b * msq)) ** 0.5,
            "inner_test": (float(dots.var(unbiased=True)) / (b * msq**2)) ** 0.5,
            "ortho_test": (float(ortho.var(0, unbiased=True).sum()) / (b * msq)) ** 0.5}
    mon = Monitor(model, ce, instruments=[GradientTests(every=1)])
    mon.step((x, y))
    mon.flush()
    assert mon.history[0] == pytest.approx({"step": 0, **want}, rel=1e-9)


def test_default_instruments_schedule():
    model = nn.Linear(3, 2)
    names = {i.name: i for i in default_instruments(torch.optim.SGD(model.parameters(), 0.1))}
    assert "precond_sharpness" not in names and "neural_collapse" not in names
    # issue 10: the loss at every step of a short run (it was every 25), then every 10
    loss = names["loss"]
    assert [t for t in range(130) if loss.due(t)] == [*range(100), 100, 110, 120]
    assert names["sharpness"].start == 1000
    adam = default_instruments(torch.optim.Adam(model.parameters()), classifier="fc")
    assert {"precond_sharpness", "neural_collapse"} <= {i.name for i in adam}


def test_per_example_losses_fast_path_equals_vmap_path():
    from gradkit.instruments import per_example_losses

    out, tgt = torch.randn(5, 2, 3), torch.randn(5, 2, 3)
    custom = lambda o, t: ((o - t) ** 2).mean()  # noqa: E731  (unknown to the fast path)
    want = per_example_losses(nn.Identity(), custom, out, tgt)
    for fn in (nn.functional.mse_loss, nn.MSELoss()):
        torch.testing.assert_close(per_example_losses(nn.Identity(), fn, out, tgt), want)
    logits, labels = torch.randn(6, 4), torch.randint(0, 4, (6,))
    ce_module = nn.CrossEntropyLoss(label_smoothing=0.1)
    torch.testing.assert_close(
        per_example_losses(nn.Identity(), ce_module, logits, labels),
        per_example_losses(nn.Identity(), lambda o, t: ce_module(o, t), logits, labels))
    assert ce_module.reduction == "mean"  # the module itself is untouched
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0, 4.0]))  # vmap path
    torch.testing.assert_close(
        per_example_losses(nn.Identity(), weighted, logits, labels),
        torch.stack([weighted(logits[i:i + 1], labels[i:i + 1]) for i in range(6)]))


def _run_loss_steps(mon, model, x, y, steps, *, step=None):
    for t in steps:
        model.zero_grad()
        loss = ce(model(x), y)
        loss.backward()
        with mon.step((x, y), loss=loss, step=None if step is None else t) as handle:
            assert handle.record["step"] == t


def test_cached_idle_steps_follow_schedule_changes_custom_schedules_and_explicit_steps():
    class Odd(Instrument):  # a custom schedule: asked at every step
        name = "odd"
        touches_model = False

        def due(self, step):
            return step % 2 == 1

        def measure(self, ctx):
            return {"odd": ctx.step}

    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    loss_ins = Loss(every=10)
    mon = Monitor(model, ce, instruments=[loss_ins, Odd()])
    _run_loss_steps(mon, model, x, y, range(6))
    loss_ins.every = 3  # changed between two due steps: the cached idle range is re-planned
    _run_loss_steps(mon, model, x, y, range(6, 13))
    loss_ins.start = 20
    _run_loss_steps(mon, model, x, y, range(13, 22))
    _run_loss_steps(mon, model, x, y, [3, 0, 20], step=True)  # explicit steps, backwards
    mon.flush()
    assert mon.series("loss")[0] == [0, 6, 9, 12, 20, 20]
    assert mon.series("odd")[0] == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 3]


def test_next_due_matches_due():
    for every, start in [(1, 0), (25, 0), (7, 3), (1000, 1000)]:
        ins = Loss(every=every, start=start)
        for t in range(0, 2100, 1 if every < 100 else 37):
            expected = next(s for s in range(t, t + every + start + 1) if ins.due(s))
            assert ins.next_due(t) == expected, (every, start, t)
    assert OpposingSignals().next_due(0) == 0


def test_update_size_instrument_equals_the_standalone_functions_bitwise():
    from gradkit.instruments import basic

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    with torch.no_grad():
        model[2].bias.zero_()  # an all-zero tensor that moves: ratio inf
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    mon = Monitor(model, ce, opt, instruments=[UpdateSize(every=1)])
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    for _ in range(3):
        opt.zero_grad()
        ce(model(x), y).backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with mon.step((x, y)) as handle:
            opt.step()
        after = dict(model.named_parameters())
        rec = handle.record
        assert rec["update_size"] == basic.update_size(before, after)
        assert rec["update_ratio"] == basic.update_ratio(before, after)
        layers = basic.layer_update_ratios(before, after)
        assert {n: rec[f"update_ratio/{n}"] for n in layers} == layers
    assert mon.history[0]["update_ratio/2.bias"] == float("inf")
