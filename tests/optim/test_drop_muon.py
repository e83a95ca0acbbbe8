"""Drop-Muon: point mass at cutoff 0 == Muon bitwise, frozen prefix untouched, frequencies."""

import copy
import math

import pytest
import torch
from torch import nn

from gradkit.optim import DropMuon, Muon, create, drop_muon_layer_groups
from tests.optim.roundtrip import assert_bitwise_resume


def mlp(depth=4, width=6):
    layers = []
    for i in range(depth):
        layers += [nn.Linear(3 if i == 0 else width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 2))


def data():
    gen = torch.Generator().manual_seed(11)
    return torch.randn(32, 3, generator=gen), torch.randn(32, 2, generator=gen)


def train(model, opt, steps, *, sample=True):
    x, y = data()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        if sample and isinstance(opt, DropMuon):
            opt.sample_cutoff()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def test_layer_groups_from_model_lists_and_tensors():
    model = mlp(depth=2)
    groups = drop_muon_layer_groups(model)
    assert [g["layer"] for g in groups] == [0, 0, 1, 1, 2, 2]
    assert [g["use_muon"] for g in groups] == [True, False] * 3
    lists = drop_muon_layer_groups([[model[0].weight, model[0].bias], [model[2].weight]])
    assert [(g["layer"], len(g["params"])) for g in lists] == [(0, 1), (0, 1), (1, 1)]
    flat = drop_muon_layer_groups([model[0].weight, model[2].weight])
    assert [g["layer"] for g in flat] == [0, 1]
    with pytest.raises(ValueError, match="mix"):
        drop_muon_layer_groups([model[0].weight, [model[2].weight]])


def test_point_mass_at_first_layer_equals_muon_bitwise():
    torch.manual_seed(1)
    model = mlp()
    twin = copy.deepcopy(model)
    drop = DropMuon(model, lr=0.05, weight_decay=0.01, probs=[1.0] + [0.0] * 4)
    muon = Muon(drop_muon_layer_groups(twin), lr=0.05, weight_decay=0.01)
    train(model, drop, 20)
    train(twin, muon, 20)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), twin.parameters()):
        for key, value in drop.state[a].items():
            assert torch.equal(value, muon.state[b][key])


def test_frozen_prefix_keeps_weights_and_momentum_and_gets_no_grad():
    torch.manual_seed(2)
    model = mlp()
    opt = DropMuon(model, lr=0.05, seed=3)
    train(model, opt, 10)  # build momentum everywhere it gets used
    x, y = data()
    seen = set()
    for _ in range(30):
        before = {id(p): p.detach().clone() for p in model.parameters()}
        momentum = {id(p): {k: v.clone() for k, v in opt.state[p].items()}
                    for p in model.parameters()}
        opt.zero_grad(set_to_none=True)
        cutoff = opt.sample_cutoff()
        seen.add(cutoff)
        nn.functional.mse_loss(model(x), y).backward()
        for group in opt.param_groups:
            for p in group["params"]:
                assert (p.grad is None) == (group["layer"] < cutoff)  # backward really stopped
        opt.step()
        assert opt.last_cutoff == cutoff
        for group in opt.param_groups:
            for p in group["params"]:
                assert p.requires_grad  # restored
                changed = not torch.equal(p.detach(), before[id(p)])
                if group["layer"] < cutoff:
                    assert not changed
                    for k, v in momentum[id(p)].items():
                        assert torch.equal(opt.state[p][k], v)
                else:
                    assert changed
    assert seen == set(range(5))


def test_step_without_sample_and_closure_form_update_a_suffix():
    torch.manual_seed(3)
    model = mlp(depth=3)
    opt = DropMuon(model, lr=0.05, seed=0)
    x, y = data()
    for _ in range(5):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        changed = [not torch.equal(a, b) for a, b in zip(model.parameters(), before)]
        # parameters come as (weight, bias) per layer: a prefix unchanged, the rest changed
        per_layer = changed[::2]
        assert per_layer == [i >= opt.last_cutoff for i in range(4)]

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None
    grads_none = [p.grad is None for p in model.parameters()][::2]
    assert grads_none == [i < opt.last_cutoff for i in range(4)]

    opt2 = DropMuon(model, lr=0.05, probs=[0.0, 0.0, 0.0, 1.0], seed=0)
    assert opt2.sample_cutoff() == 3
    assert [p.requires_grad for p in model.parameters()] == [False] * 6 + [True] * 2
    opt2.release_cutoff()  # skip this step: everything trainable again, nothing pending
    assert all(p.requires_grad for p in model.parameters()) and opt2.cutoff is None


def test_uniform_update_frequency_is_i_over_b():
    model = mlp(depth=5)  # b = 6 layers
    opt = DropMuon(model, lr=0.0, seed=123)
    b, n = opt.num_layers, 3000
    counts = torch.zeros(b)
    for _ in range(n):
        s = opt.sample_cutoff()
        counts[s:] += 1
        opt.step()
    for i in range(b):
        p = (i + 1) / b
        assert abs(counts[i].item() / n - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-12


def test_custom_distribution_and_validation():
    model = mlp(depth=2)
    opt = DropMuon(model, probs=[0.0, 0.0, 1.0], seed=0)
    assert {opt.sample_cutoff() for _ in range(20)} == {2}
    opt.step()
    for bad, text in [([0.5, 0.5], "3 probabilities"), ([0.5, 0.6, -0.1], ">= 0"),
                      ([0.2, 0.2, 0.2], "sum to 1"), ([float("nan"), 0.5, 0.5], "finite")]:
        with pytest.raises(ValueError, match=text):
            DropMuon(model, probs=bad)
    with pytest.raises(ValueError, match="learning rate"):
        DropMuon(model, lr=-1.0)


def test_state_dict_round_trip_includes_the_cutoff_generator():
    torch.manual_seed(4)

    def run(model, opt, start, n):
        train(model, opt, n)

    _, fresh_opt, _ = assert_bitwise_resume(
        mlp, lambda m: DropMuon(m, lr=0.05, seed=9), run, steps=30,
        build_fresh_opt=lambda m: DropMuon(m, lr=0.05, seed=0))  # seed restored by loading
    clone = copy.deepcopy(fresh_opt)
    assert clone.probs is None and clone.num_layers == 5 and "drop_muon_generator" in \
        clone.state_dict()
    torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda k: 0.1)
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(0.005)


def test_registry_create():
    model = mlp(depth=1)
    opt = create("dropmuon", model, lr=0.01)
    assert isinstance(opt, DropMuon) and opt.num_layers == 2


def test_named_parameters_one_layer_per_module():
    """``model.named_parameters()`` as torch accepts it: layers are the owning modules, the
    steps equal DropMuon(model), and the names are kept in the groups and the state_dict."""
    torch.manual_seed(4)
    model = mlp(depth=2)
    twin = copy.deepcopy(model)
    named = DropMuon(model.named_parameters(), lr=0.05, seed=5)
    plain = DropMuon(twin, lr=0.05, seed=5)
    assert [g["layer"] for g in named.param_groups] == [g["layer"] for g in plain.param_groups]
    assert named.param_groups[0]["param_names"] == ["0.weight"]
    assert named.param_groups[1]["param_names"] == ["0.bias"]
    train(model, named, 6)
    train(twin, plain, 6)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    saved = named.state_dict()
    assert [n for g in saved["param_groups"] for n in g["param_names"]] == [
        n for n, _ in model.named_parameters()]
    again = DropMuon(copy.deepcopy(model).named_parameters(), lr=0.05)
    again.load_state_dict(saved)
