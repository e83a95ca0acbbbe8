"""AdaptiveBatchSize controller: the spec's hand-computed example end to end, a synthetic
problem with known gradient covariance, lr rescaling, sampler / DataLoader coupling."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradkit.batching import AdaptiveBatchSampler, AdaptiveBatchSize
from gradkit.schedules import LinearDecayLR


def _linear_probe(dim):
    """A model whose per-example gradient is exactly the example's input: loss_i = <w, x_i>."""
    model = nn.Linear(dim, 1, bias=False).double()

    def loss_fn(out, y):
        return (out.squeeze(-1) * y).mean()

    return model, loss_fn


KAT_X = torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
ONES = torch.ones(2, dtype=torch.float64)


@pytest.mark.parametrize("eta, expected", [(0.5, 2), (0.1, 50)])
def test_spec_example_through_the_controller(eta, expected):
    model, loss_fn = _linear_probe(2)
    ctl = AdaptiveBatchSize(model, loss_fn, initial_batch_size=2, max_batch_size=1000, eta=eta)
    decision = ctl.step(KAT_X, ONES)
    assert decision.next_batch_size == expected == ctl.batch_size
    assert ctl.history == [(0, decision)]


def test_inner_product_and_orthogonality_through_the_controller():
    model, loss_fn = _linear_probe(2)
    ctl = AdaptiveBatchSize(model, loss_fn, initial_batch_size=2, max_batch_size=1000,
                            test="inner_product", theta=0.5)
    assert ctl.step(KAT_X, ONES).statistic == pytest.approx(2.0)
    ctl = AdaptiveBatchSize(model, loss_fn, initial_batch_size=2, max_batch_size=1000,
                            test="orthogonality")
    assert ctl.step(KAT_X, ONES).next_batch_size == 2  # g⊥ = 0: no increase


def test_synthetic_known_variance_through_per_example_grads():
    gen = torch.Generator().manual_seed(0)
    G = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    scales = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)  # Σ = diag(scales²)
    x = G + torch.randn(20_000, 3, generator=gen, dtype=torch.float64) * scales
    model, loss_fn = _linear_probe(3)
    ctl = AdaptiveBatchSize(model, loss_fn, initial_batch_size=8, max_batch_size=10**6,
                            eta=0.25, chunk_size=None)
    decision = ctl.step(x, torch.ones(20_000, dtype=torch.float64))
    expected = float(scales.square().sum()) / (0.25**2 * float(G @ G))  # tr Σ / (η² ||G||²)
    assert decision.statistic == pytest.approx(expected, rel=0.05)
    assert abs(ctl.batch_size - math.ceil(expected)) <= 0.05 * expected + 1


@pytest.mark.parametrize("rule, factor", [("linear", 25.0), ("sqrt", 5.0)])
def test_lr_rescaling_and_scheduler_base_lrs(rule, factor):
    model, loss_fn = _linear_probe(2)
    opt = torch.optim.SGD([{"params": model.parameters(), "lr": 0.1},
                           {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.02}])
    sched = LinearDecayLR(opt, total_steps=100)
    ctl = AdaptiveBatchSize(model, loss_fn, initial_batch_size=2, max_batch_size=1000,
                            optimizer=opt, lr_rule=rule, scheduler=sched)
    ctl.step(KAT_X, ONES)  # 2 -> 50
    assert ctl.lr_scale == pytest.approx(factor)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * factor, 0.02 * factor])
    assert sched.base_lrs == pytest.approx([0.1 * factor, 0.02 * factor])
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * factor * (1 - 1 / 99))


def test_auto_rule_picks_sqrt_for_adam():
    model, loss_fn = _linear_probe(2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctl = AdaptiveBatchSize(model, loss_fn, initial_batch_size=2, max_batch_size=1000,
                            optimizer=opt, lr_rule="auto")
    ctl.step(KAT_X, ONES)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 5.0)


def test_test_interval_and_cap():
    model, loss_fn = _linear_probe(2)
    ctl = AdaptiveBatchSize(model, loss_fn, initial_batch_size=2, max_batch_size=10,
                            test_interval=3)
    results = [ctl.step(KAT_X, ONES) for _ in range(7)]
    assert [r is not None for r in results] == [True, False, False, True, False, False, True]
    assert ctl.batch_size == 10  # asks for 50, capped
    assert [i for i, _ in ctl.history] == [0, 3, 6]


def test_update_with_precomputed_gradients():
    model, loss_fn = _linear_probe(2)
    ctl = AdaptiveBatchSize(model, loss_fn, initial_batch_size=2, max_batch_size=100)
    assert ctl.update(KAT_X).next_batch_size == 50


def test_dataloader_loop_batch_sizes_follow_the_controller():
    torch.manual_seed(0)
    n = 600
    x = torch.randn(n, 5)
    y = (x @ torch.randn(5) > 0).long()
    ds = TensorDataset(x, y)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    loss_fn = nn.functional.cross_entropy
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ctl = AdaptiveBatchSize(model, loss_fn, initial_batch_size=4, max_batch_size=128,
                            eta=0.3, optimizer=opt, lr_rule="linear")
    loader = DataLoader(ds, batch_sampler=ctl.make_sampler(ds, seed=0))
    drawn, planned = [], []
    for _ in range(2):
        for xb, yb in loader:
            drawn.append(len(xb))
            planned.append(ctl.batch_size)
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
            ctl.step(xb, yb)
    full = [d for d, p in zip(drawn, planned) if d == p]
    assert len(full) >= len(drawn) - 2  # only the last batch of an epoch may be short
    assert planned == sorted(planned) and planned[-1] > 4  # grew, never shrank
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * ctl.batch_size / 4)


def test_state_dict_round_trip():
    model, loss_fn = _linear_probe(2)
    ctl = AdaptiveBatchSize(model, loss_fn, initial_batch_size=2, max_batch_size=100)
    ctl.step(KAT_X, ONES)
    other = AdaptiveBatchSize(model, loss_fn, initial_batch_size=2, max_batch_size=100,
                              sampler=AdaptiveBatchSampler(10, 2))
    other.load_state_dict(ctl.state_dict())
    assert (other.batch_size, other.num_steps, other.sampler.batch_size) == (50, 1, 50)


def test_errors():
    model, loss_fn = _linear_probe(2)
    kw = {"initial_batch_size": 2, "max_batch_size": 10}
    with pytest.raises(ValueError, match="Invalid test"):
        AdaptiveBatchSize(model, loss_fn, test="variance", **kw)
    with pytest.raises(ValueError, match="needs the optimizer"):
        AdaptiveBatchSize(model, loss_fn, lr_rule="linear", **kw)
    with pytest.raises(ValueError, match="Invalid eta value"):
        AdaptiveBatchSize(model, loss_fn, eta=0.0, **kw)
    with pytest.raises(ValueError, match="Invalid max_batch_size value: 1"):
        AdaptiveBatchSize(model, loss_fn, initial_batch_size=2, max_batch_size=1)
    with pytest.raises(ValueError, match="Invalid test_interval"):
        AdaptiveBatchSize(model, loss_fn, test_interval=0, **kw)
    with pytest.raises(ValueError, match="initial_batch_size"):
        AdaptiveBatchSize(model, loss_fn, max_batch_size=10)
    with pytest.raises(ValueError, match="Invalid rule"):
        AdaptiveBatchSize(model, loss_fn, optimizer=torch.optim.SGD(model.parameters(), lr=1),
                          lr_rule="cubic", **kw)


def test_batch_of_one_skips_the_test():
    model, loss_fn = _linear_probe(2)
    ctl = AdaptiveBatchSize(model, loss_fn, initial_batch_size=2, max_batch_size=100)
    assert ctl.step(KAT_X[:1], ONES[:1]) is None
    assert ctl.batch_size == 2 and ctl.num_steps == 1 and ctl.history == []
