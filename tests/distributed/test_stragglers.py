"""Straggler models: bursty-model check, seeded generators, order statistics."""

import pytest
import torch

from gradkit.distributed.stragglers import (
    BurstyStragglers,
    ExponentialDelays,
    bursty_admits,
    expected_order_statistic,
    stragglers_from_delays,
)


def _mask(*rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_bursty_admits_spatial():
    history = _mask([1, 0, 0], [0, 0, 0])
    # W = 3: rounds 0..2 see workers {0, 2} → too many for λ = 1, fine for λ = 2
    assert not bursty_admits(history, [2], B=1, W=3, lam=1)
    assert bursty_admits(history, [2], B=1, W=3, lam=2)
    # W = 2: round 0 has left the window
    assert bursty_admits(history, [2], B=1, W=2, lam=1)


def test_bursty_admits_temporal():
    history = _mask([0, 0], [1, 0])
    # worker 0 straggled in round 1: continuing in round 2 is a burst of 2
    assert not bursty_admits(history, [0], B=1, W=3, lam=2)
    assert bursty_admits(history, [0], B=2, W=3, lam=2)
    # a second burst of worker 0 inside one window is refused even when short
    history = _mask([1, 0], [0, 0])
    assert not bursty_admits(history, [0], B=1, W=3, lam=2)
    assert bursty_admits(history, [0], B=1, W=2, lam=2)
    # nothing recorded yet
    assert bursty_admits(torch.zeros(0, 2, dtype=torch.bool), [0, 1], B=1, W=2, lam=2)
    assert not bursty_admits(torch.zeros(0, 2, dtype=torch.bool), [0, 1], B=1, W=2, lam=1)


def test_bursty_generator_conforms_and_is_seeded():
    gen = BurstyStragglers(n=6, B=2, W=4, lam=3, p=0.5, seed=7)
    pattern = gen.sample(60)
    assert pattern.shape == (60, 6) and pattern.any()
    for r in range(60):
        assert bursty_admits(pattern[:r], pattern[r], 2, 4, 3)
    # bursts longer than one round happen
    assert (pattern[1:] & pattern[:-1]).any()
    assert torch.equal(pattern, BurstyStragglers(6, 2, 4, 3, p=0.5, seed=7).sample(60))
    assert not torch.equal(pattern, BurstyStragglers(6, 2, 4, 3, p=0.5, seed=8).sample(60))


def test_exponential_delays():
    model = ExponentialDelays(n=5, mean=2.0, shift=0.5, seed=3)
    d = model.sample(4000)
    assert d.shape == (4000, 5) and d.dtype == torch.float64
    assert torch.equal(d, ExponentialDelays(5, 2.0, 0.5, seed=3).sample(4000))
    assert torch.equal(model.sample(10, load=3.0), 3.0 * model.sample(10))
    assert (d >= 0.5).all()
    # order statistics match E[τ_(k:n)] = shift + mean Σ_{j=n-k+1}^{n} 1/j (seeded sample)
    sorted_d = d.sort(dim=1).values
    for k in range(1, 6):
        assert sorted_d[:, k - 1].mean().item() == pytest.approx(model.expected(k), rel=0.05)


def test_expected_order_statistic_kat():
    assert expected_order_statistic(1, 1, mean=2.0, shift=1.0) == 3.0
    assert expected_order_statistic(2, 2) == 1.5  # H_2
    assert expected_order_statistic(2, 1) == 0.5  # min of two Exp(1)
    assert expected_order_statistic(4, 3) == pytest.approx(1 / 4 + 1 / 3 + 1 / 2)
    with pytest.raises(ValueError, match="Invalid k value: 5"):
        expected_order_statistic(4, 5)


def test_stragglers_from_delays():
    delays = torch.tensor([[1.0, 1.05, 1.2], [2.0, 1.0, 1.0]])
    expected = [[False, False, True], [True, False, False]]
    assert stragglers_from_delays(delays, 0.1).tolist() == expected
    assert stragglers_from_delays(delays[0], 0.0).tolist() == [False, True, True]


def test_validation():
    with pytest.raises(ValueError, match="Invalid mean value: 0"):
        ExponentialDelays(3, mean=0)
    with pytest.raises(ValueError, match="Invalid shift value: -1"):
        ExponentialDelays(3, shift=-1)
    with pytest.raises(ValueError, match=r"Invalid p value: 1.5"):
        BurstyStragglers(3, 1, 2, 1, p=1.5)
    with pytest.raises(ValueError, match=r"Invalid B value: 2 .*B < W = 2"):
        BurstyStragglers(3, 2, 2, 1)
    with pytest.raises(ValueError, match=r"Invalid mu value: -0.1"):
        stragglers_from_delays(torch.ones(3), -0.1)
    with pytest.raises(ValueError, match="out of range"):
        bursty_admits(torch.zeros(1, 2, dtype=torch.bool), [2], 1, 2, 1)
