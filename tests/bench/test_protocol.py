"""Search spaces, the declared optimizer table, selection and trial keys."""

import math

import numpy as np
import pytest
from torch import nn

from gradkit.bench import optimizers as bopt
from gradkit.bench.protocol import select
from gradkit.bench.records import TrialRecord
from gradkit.bench.runner import trial_key
from gradkit.bench.search import LogUniform, sample, unit_points
from gradkit.errors import UsageError


def test_halton_points_are_seeded_and_in_the_unit_cube():
    a, b, c = unit_points(8, 2, seed=3), unit_points(8, 2, seed=3), unit_points(8, 2, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert ((a >= 0) & (a < 1)).all()


def test_log_uniform_maps_ends_and_middle():
    space = LogUniform(1e-4, 1e-1)
    assert space.at(0.0) == pytest.approx(1e-4)
    assert space.at(1.0) == pytest.approx(1e-1)
    assert space.at(0.5) == pytest.approx(math.sqrt(1e-5), rel=1e-3)
    with pytest.raises(ValueError, match="log-uniform"):
        LogUniform(0.0, 1.0)


def test_sample_stays_in_range():
    for config in sample({"lr": LogUniform(1e-3, 1.0)}, 16, seed=0):
        assert 1e-3 <= config["lr"] <= 1.0


def test_defaults_trial_first_then_common_quasi_random_positions():
    sgd, adam = bopt.resolve_optimizer("sgd"), bopt.resolve_optimizer("adam")
    sgd_cfg, adam_cfg = sgd.configs(4, seed=0), adam.configs(4, seed=0)
    assert sgd_cfg[0] == {"momentum": 0.9, "lr": 1e-3}  # torch SGD default lr, momentum fixed
    assert adam_cfg[0] == {"lr": 1e-3}
    assert len(sgd_cfg) == len(adam_cfg) == 5
    # same relative position in each (3-decade) range: common random numbers
    for s, a in zip(sgd_cfg[1:], adam_cfg[1:]):
        u_s = math.log(s["lr"] / 1e-3) / math.log(1e3)
        u_a = math.log(a["lr"] / 1e-4) / math.log(1e3)
        assert u_s == pytest.approx(u_a, abs=1e-3)


def test_unlisted_optimizer_gets_three_decades_around_its_default():
    spec = bopt.resolve_optimizer("rmsprop")  # torch default lr 1e-2
    assert spec.search["lr"].low == pytest.approx(1e-2 / 10**1.5, rel=1e-3)
    assert spec.search["lr"].high == pytest.approx(1e-2 * 10**1.5, rel=1e-3)
    assert spec.defaults == {"lr": 1e-2}
    assert spec.is_torch_baseline


def test_user_class_spec_and_rejections():
    spec = bopt.resolve_optimizer("tests.bench.fixture_user:SignSGD")
    assert spec.defaults == {"lr": 0.01} and not spec.is_torch_baseline
    with pytest.raises(UsageError, match=r"not a torch\.optim\.Optimizer subclass"):
        bopt.resolve_optimizer("tests.bench.fixture_user:NotAnOptimizer")
    with pytest.raises(UsageError, match=r"unknown optimizer 'nope'; valid: .*adam"):
        bopt.resolve_optimizer("nope")


def test_default_set_skips_unregistered_names_with_a_note(monkeypatch):
    monkeypatch.setattr(bopt, "registry_names", lambda: ["sgd", "adam"])
    specs, notes = bopt.default_optimizers()
    assert [s.name for s in specs] == ["sgd", "adam"]
    skipped = {e.name for e in bopt.DEFAULT_TABLE} - {"sgd", "adam"}
    assert len(notes) == len(skipped)
    assert all("not registered" in n for n in notes)


def test_muon_spec_splits_params_and_ties_aux_lr():
    if "muon" not in bopt.registry_names():
        pytest.skip("muon is not registered in gradkit.optim")
    spec = bopt.resolve_optimizer("muon")
    config = spec.configs(1, seed=0)[1]
    assert config["adamw_lr"] == pytest.approx(0.015 * config["lr"], rel=1e-3)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 3))
    opt = spec.build(model, config)
    by_flag = {g["use_muon"]: g["params"] for g in opt.param_groups}
    assert [p.ndim for p in by_flag[True]] == [2, 2]  # hidden matrices; the head is AdamW
    assert any(p is model[4].weight for p in by_flag[False])


def _row(index, status="ok", steps=None, val=None):
    return TrialRecord(status=status, steps_to_target=steps, final_val_metric=val,
                       key=f"k{index}", suite="s", version="1", workload="w", optimizer="o",
                       hparams={}, seed=0, phase="tune", trial_index=index)


def test_selection_order():
    rows = [_row(0, steps=None, val=0.99), _row(1, steps=40, val=0.90), _row(2, steps=30,
            val=0.80, status="diverged"), _row(3, steps=40, val=0.95)]
    assert select(rows, higher_is_better=True).trial_index == 3  # fastest ok, then best val
    rows = [_row(0, val=0.5), _row(1, val=0.2), _row(2, status="failed")]
    assert select(rows, higher_is_better=False).trial_index == 1  # all missed: best val
    assert select([_row(1, val=0.3), _row(0, val=0.3)], True).trial_index == 0


def test_trial_key_is_stable_and_sensitive():
    args = ("quick", "1", {"spec": "mlp", "steps": 200}, "adam", {"lr": 0.01}, 0)
    assert trial_key(*args) == trial_key(*args)
    assert trial_key(*args) == trial_key("quick", "1", {"steps": 200, "spec": "mlp"}, "adam",
                                         {"lr": 0.01}, 0)
    changed = [("quick", "2", *args[2:]), (*args[:4], {"lr": 0.02}, 0), (*args[:5], 1),
               (*args[:3], "sgd", *args[4:])]
    assert len({trial_key(*c) for c in changed} | {trial_key(*args)}) == 5


def test_optimizer_settings_fix_or_search_hyperparameters():
    fixed = bopt.resolve_optimizer("adamw:weight_decay=0.1")
    assert fixed.name == "adamw:weight_decay=0.1" and set(fixed.search) == {"lr"}
    assert all(c["weight_decay"] == 0.1 for c in fixed.configs(3, 0))
    ranged = bopt.resolve_optimizer("adamw:weight_decay=1e-4..1e-1")
    assert set(ranged.search) == {"lr", "weight_decay"}
    assert ranged.defaults["weight_decay"] == 0.01  # AdamW's own default is inside the range
    assert len({c["weight_decay"] for c in ranged.configs(4, 0)}) == 5
    one = bopt.resolve_optimizer("adamw:lr=0.01")  # nothing left to search: one config
    assert one.search == {} and {json_key(c) for c in one.configs(4, 0)} == {'{"lr": 0.01}'}
    muon = bopt.resolve_optimizer("muon:lr=0.02")  # a fixed lr fixes what is tied to it
    assert muon.configs(1, 0)[0] == {"lr": 0.02, "adamw_lr": 0.0003}
    user = bopt.resolve_optimizer("tests.bench.fixture_user:SignSGD:lr=1e-3..1e-1")
    assert user.search["lr"] == LogUniform(1e-3, 1e-1) and user.defaults == {"lr": 0.01}
    for bad, message in (("adamw:wd=1", "AdamW takes no wd"), ("adamw:lr=0..1", "a range"),
                         ("adamw:lr=1,lr=2", "set twice"), ("adamw:=3", "malformed")):
        with pytest.raises(UsageError, match=message):
            bopt.resolve_optimizer(bad)


def json_key(config):
    import json

    return json.dumps(config, sort_keys=True)
