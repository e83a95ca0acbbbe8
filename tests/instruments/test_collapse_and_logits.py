"""KAT 15 (neural collapse), KAT 17 (softmax collapse), KAT 19 (opposing signals) and the
cheap norms/alignment functions."""

import pytest
import torch
from torch import nn

from gradkit.instruments import (
    global_norm,
    layer_update_ratios,
    max_abs_logit,
    neural_collapse,
    nlm_alignment,
    opposing_signals,
    per_example_losses,
    softmax_collapse_fraction,
    update_ratio,
    update_size,
    zero_loss_fraction,
)

# ---------------------------------------------------------------- neural collapse (KAT 15)


def _etf(c=4, p=7, per_class=5, seed=0):
    """Features exactly on a simplex ETF (no within-class noise) in p dims; W = M."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(p, c, generator=gen, dtype=torch.float64))
    m = (c / (c - 1)) ** 0.5 * u @ (torch.eye(c, dtype=torch.float64) - 1.0 / c)  # p × C
    labels = torch.arange(c).repeat_interleave(per_class)
    feats = m.T[labels].clone()
    return feats, labels, m.T.clone(), gen


def test_simplex_etf_gives_zero_for_every_metric():
    feats, labels, w, _ = _etf()
    nc = neural_collapse(feats, labels, w, torch.zeros(4, dtype=torch.float64))
    for name, value in nc._asdict().items():
        assert value == pytest.approx(0.0, abs=1e-10), name
    u = feats[::5] / feats[::5].norm(dim=1, keepdim=True)  # one per class
    off = (u @ u.T)[~torch.eye(4, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1 / 3))


def test_metrics_grow_with_noise():
    feats, labels, w, gen = _etf()
    noise = torch.randn(feats.shape, generator=gen, dtype=torch.float64)
    w_noise = torch.randn(w.shape, generator=gen, dtype=torch.float64)
    small = neural_collapse(feats + 0.05 * noise, labels, w + 0.05 * w_noise)
    large = neural_collapse(feats + 0.3 * noise, labels, w + 0.3 * w_noise)
    for name in small._fields:
        if name == "nc4":
            continue
        assert 0 < small._asdict()[name] < large._asdict()[name], name
    huge = neural_collapse(feats + 3.0 * noise, labels, w)
    assert huge.nc4 > 0


def test_nc1_matches_full_pseudo_inverse_definition():
    feats, labels, w, gen = _etf(c=5, p=9)
    h = feats + 0.2 * torch.randn(feats.shape, generator=gen, dtype=torch.float64)
    mu = torch.stack([h[labels == c].mean(0) for c in range(5)])
    centred = mu - mu.mean(0)
    sw = sum((h[labels == c] - mu[c]).T @ (h[labels == c] - mu[c]) for c in range(5)) / len(h)
    sb = centred.T @ centred / 5
    want = float(torch.trace(sw @ torch.linalg.pinv(sb, hermitian=True, rtol=1e-10))) / 5
    assert neural_collapse(h, labels, w).nc1 == pytest.approx(want, rel=1e-8)


def test_nc4_uses_argmax_of_w_h_plus_b():
    feats, labels, w, _ = _etf(c=3)
    # argmax(Wh) is the right class everywhere (argmin, the nc-toolbox pitfall, never is)
    assert neural_collapse(feats, labels, w).nc4 == 0.0
    assert neural_collapse(feats, labels, -w).nc4 == 1.0
    bias = torch.tensor([100.0, 0.0, 0.0], dtype=torch.float64)  # bias decides: always 0
    assert neural_collapse(feats, labels, w, bias).nc4 == pytest.approx(2 / 3)


def test_neural_collapse_input_errors():
    feats, labels, w, _ = _etf()
    with pytest.raises(ValueError, match="dims"):
        neural_collapse(feats[:, :3], labels, w)
    with pytest.raises(ValueError, match="labels"):
        neural_collapse(feats, labels + 10, w)


# --------------------------------------------------------- softmax collapse (KAT 17)


def test_softmax_collapse_in_training_precision():
    big = torch.tensor([[1000.0, 0.0, 0.0, 0.0]])
    small = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert softmax_collapse_fraction(big) == 1.0
    assert softmax_collapse_fraction(small) == 0.0
    assert softmax_collapse_fraction(torch.cat([big, small, small, big])) == 0.5
    mid = torch.tensor([[20.0, 0.0]])  # e^-20 ≈ 2e-9: absorbed in fp32, not in fp64
    assert softmax_collapse_fraction(mid) == 1.0
    assert softmax_collapse_fraction(mid.double()) == 0.0


def test_zero_loss_fraction_and_max_logit_from_per_example_losses():
    logits = torch.tensor([[1000.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 3.0, -500.0]])
    targets = torch.tensor([0, 0, 1])
    losses = per_example_losses(nn.Identity(), nn.functional.cross_entropy, logits, targets)
    torch.testing.assert_close(losses, nn.functional.cross_entropy(logits, targets,
                                                                   reduction="none"))
    assert losses[0] == 0.0
    assert zero_loss_fraction(losses) == pytest.approx(1 / 3)
    assert max_abs_logit(logits) == 1000.0


# ------------------------------------------------------------- opposing signals (KAT 19)


def test_opposing_signal_ranking_recovers_planted_groups():
    gen = torch.Generator().manual_seed(3)
    n, d = 40, 6
    x = 0.3 * torch.randn(n, d, generator=gen)
    y = torch.randint(0, 2, (n,), generator=gen)
    group_a = torch.tensor([3, 11, 17, 25, 30, 36])  # big shared feature 0, label 1
    group_b = torch.tensor([5, 8, 22, 33])  # same feature, opposite label
    x[:, 0] = 0.0
    x[group_a, 0], y[group_a] = 4.0, 1
    x[group_b, 0], y[group_b] = 4.0, 0
    model = nn.Linear(d, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    loss_fn = nn.functional.cross_entropy
    before = per_example_losses(model, loss_fn, x, y)
    loss_fn(model(x), y).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    after = per_example_losses(model, loss_fn, x, y)
    ids = torch.arange(100, 100 + n)
    res = opposing_signals(before, after, k=4, index=ids)
    assert set(res.increase_index) == set((group_b + 100).tolist())  # minority loses
    res6 = opposing_signals(before, after, k=6, index=ids)
    assert set(res6.decrease_index) == set((group_a + 100).tolist())
    assert res.increase_delta == sorted(res.increase_delta, reverse=True)
    assert res6.decrease_delta == sorted(res6.decrease_delta)


def test_opposing_signals_only_lists_real_increases():
    res = opposing_signals(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.5, 2.0, 0.9]), k=3)
    assert res.increase_index == [1] and res.decrease_index == [0, 2]
    assert res.fraction_increased == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="k"):
        opposing_signals(torch.ones(2), torch.ones(2), k=0)


# ------------------------------------------------------------------- cheap quantities


def test_norms_updates_and_alignment_by_hand():
    before = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    after = {"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([4.0])}
    assert global_norm(before) == pytest.approx(5.0)
    assert update_size(before, after) == pytest.approx(1.0)
    assert update_ratio(before, after) == pytest.approx(0.2)
    assert layer_update_ratios(before, after) == pytest.approx({"a": 1 / 3, "b": 0.0})
    w = [torch.tensor([1.0, 2.0]), torch.tensor([2.0])]
    assert nlm_alignment([-0.1 * t for t in w], w) == pytest.approx(1.0)  # descent = +w
    assert nlm_alignment(w, w) == pytest.approx(-1.0)
    assert nlm_alignment([torch.tensor([2.0, -1.0]), torch.tensor([0.0])], w) == pytest.approx(0)
