"""refine_schedule (methods.md §7): KATs, an independent reference of the formula, the
median-filter smoothing against a naive loop, spike robustness, reduction to linear decay,
and RefinedLR as an LRScheduler."""

import io

import numpy as np
import pytest
import torch
from torch import nn

from gradkit.schedules import (
    LinearDecayLR,
    RefinedLR,
    RefinedSchedule,
    median_smooth,
    refine_schedule,
)


def ref_refine(norms, norm="l2"):
    """Independent: η_t = w_t Σ_{p>t} w_p with an explicit double loop, normalised."""
    w = [1 / g**2 if norm == "l2" else 1 / g for g in norms]
    eta = [w[t] * sum(w[p] for p in range(t + 1, len(w))) for t in range(len(w))]
    return [e / max(eta) for e in eta]


def test_known_answers():
    assert refine_schedule([3.0] * 5, tau=0).values == pytest.approx([1, 0.75, 0.5, 0.25, 0])
    assert refine_schedule([1, 1, 2, 2], tau=0).values == pytest.approx([1, 1 / 3, 1 / 24, 0])
    # ℓ1: w = [1, 1, .5, .5], tails [2, 1, .5, 0] -> [2, 1, .25, 0] / 2
    assert refine_schedule([1, 1, 2, 2], norm="l1", tau=0).values == pytest.approx(
        [1, 0.5, 0.125, 0])


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_matches_independent_reference(norm):
    rng = np.random.default_rng(0)
    g = np.exp(rng.normal(size=60))
    got = refine_schedule(g, norm=norm, tau=0).values
    assert got == pytest.approx(ref_refine(list(g), norm), rel=1e-12, abs=1e-15)


def naive_median_smooth(x, width):
    """Pad the end by reflection (2·width samples), 'nearest' at the start, per-sample median."""
    padded = np.concatenate([x, x[-2::-1][: 2 * width]])
    half = width // 2
    out = []
    for i in range(len(x)):
        window = [padded[min(max(j, 0), len(padded) - 1)] for j in range(i - half, i + half + 1)]
        out.append(np.median(window))
    return np.array(out)


def test_median_smoothing_matches_naive_loop():
    rng = np.random.default_rng(1)
    x = np.abs(rng.normal(size=400)) + 1
    got = median_smooth(x, tau=0.1, smoothing_points=0)  # no resampling, width 41
    np.testing.assert_allclose(got, naive_median_smooth(x, 41), rtol=0, atol=0)
    up = median_smooth(x[:100], tau=0.1, smoothing_points=400)  # resampled to 400 first
    resampled = np.interp(np.linspace(0, 1, 400), np.linspace(0, 1, 100), x[:100])
    np.testing.assert_allclose(up, naive_median_smooth(resampled, 41), rtol=0, atol=0)


def test_single_spike_does_not_change_the_shape():
    flat = np.full(300, 1.5)
    flat_spiked = flat.copy()
    flat_spiked[120] = 50.0
    assert refine_schedule(flat_spiked).values == refine_schedule(flat).values  # exactly
    t = np.linspace(0, 1, 300)
    base = 2.0 - t  # gradient norms shrinking during training
    spiked = base.copy()
    spiked[120] = 50.0
    smooth, with_spike = refine_schedule(base), refine_schedule(spiked)
    # the median moves by the few ranks the (resampled) spike occupies: a < 1% change
    assert np.max(np.abs(np.subtract(smooth.values, with_spike.values))) < 0.01
    raw, raw_spike = refine_schedule(base, tau=0), refine_schedule(spiked, tau=0)
    assert np.max(np.abs(np.subtract(raw.values, raw_spike.values))) > 0.1  # unsmoothed: it does


@pytest.mark.parametrize("tau", [0.0, 0.1])
def test_constant_norms_reduce_to_linear_decay(tau):
    recorded = refine_schedule(np.full(37, 0.7), tau=tau)
    assert recorded.values == pytest.approx(1 - np.arange(37) / 36, abs=1e-12)
    total = 50

    def opt():
        return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.3)

    ours, lin = RefinedLR(opt(), recorded, total), LinearDecayLR(opt(), total)
    for _ in range(total + 3):
        assert ours.get_last_lr() == pytest.approx(lin.get_last_lr(), abs=1e-12)
        ours.optimizer.step()
        lin.optimizer.step()
        ours.step()
        lin.step()


def test_drops_nonfinite_zero_and_edges():
    clean = refine_schedule([1, 1, 2, 2], tau=0).values
    assert refine_schedule([1, np.inf, 1, np.nan, 2, 0.0, 2, -np.inf], tau=0).values == clean
    assert refine_schedule([9, 9, 1, 1, 2, 2, 7], tau=0, drop_first=2, drop_last=1).values == clean


def test_n_points_and_interpolation():
    s = refine_schedule([1, 1, 2, 2], tau=0, n_points=7)
    assert len(s) == 7 and s.values[0] == 1.0 and s.values[-1] == 0.0
    s4 = refine_schedule([1, 1, 2, 2], tau=0)
    assert s4(1 / 3) == pytest.approx(1 / 3) and s4(1 / 6) == pytest.approx(2 / 3)
    assert s4(2.0) == 0.0 and s4.at_step(0, 10) == 1.0


def test_refined_lr_follows_the_schedule_and_resumes(tmp_path):
    sched = refine_schedule([1, 1, 2, 2], tau=0)
    opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": 0.5},
                           {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.1}])
    lr = RefinedLR(opt, sched, total_steps=7)  # grid at steps 0, 2, 4, 6
    seen = [lr.get_last_lr()]
    for _ in range(6):
        opt.step()
        lr.step()
        seen.append(lr.get_last_lr())
    assert [s[0] for s in seen] == pytest.approx(
        [0.5, 0.5 * 2 / 3, 0.5 / 3, 0.5 * (1 / 3 + 1 / 24) / 2, 0.5 / 24, 0.5 / 48, 0])
    assert [s[1] for s in seen] == pytest.approx([v / 5 for v in [s[0] for s in seen]])
    buf = io.BytesIO()
    torch.save(lr.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    other = RefinedLR(opt2, [1.0, 1.0], total_steps=3)
    other.load_state_dict(state)
    assert other.schedule == sched and other.factor(2) == pytest.approx(1 / 3)
    sched.save(tmp_path / "s.json")
    assert RefinedSchedule.load(tmp_path / "s.json") == sched


def test_errors():
    with pytest.raises(ValueError, match="at least 2"):
        refine_schedule([1.0, np.inf])
    with pytest.raises(ValueError, match="non-negative"):
        refine_schedule([1.0, -1.0, 2.0])
    with pytest.raises(ValueError, match="Invalid norm"):
        refine_schedule([1.0, 2.0], norm="linf")
    with pytest.raises(ValueError, match="Invalid tau value"):
        refine_schedule([1.0, 2.0], tau=2)
    with pytest.raises(ValueError, match="Invalid n_points"):
        refine_schedule([1.0, 2.0], n_points=1)
    with pytest.raises(ValueError, match="finite and non-negative"):
        RefinedSchedule((1.0, -0.5))
