import pytest
import torch
from torch import nn

from gradkit.bench.workloads import DigitsMLP, LogisticRegression
from gradkit.distributed.aggregators import CoordinateMedian, Krum, Mean, TrimmedMean
from gradkit.distributed.attacks import (
    ATTACKS,
    InnerProductManipulation,
    LabelFlipping,
    SignFlipping,
)
from gradkit.distributed.simulator import (
    ATTACK_STREAM,
    Simulator,
    dirichlet_partition,
    round_matrix,
    setup_workload,
    worker_generator,
    worker_gradient,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


def _toy(n_workers=5, per_worker=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_workers * per_worker, 4, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    shards = [(x[i::n_workers], y[i::n_workers]) for i in range(n_workers)]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return model, nn.functional.cross_entropy, shards


# ------------------------------------------------------------------------- data split
def test_dirichlet_partition_is_a_deterministic_skewed_partition():
    y = torch.arange(600) % 6
    parts = dirichlet_partition(y, 8, alpha=0.1, seed=3)
    assert sorted(torch.cat(parts).tolist()) == list(range(600))  # disjoint and complete
    assert all(len(p) > 0 for p in parts)
    again = dirichlet_partition(y, 8, alpha=0.1, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))

    def dominant_share(parts):  # mean share of each shard's most frequent label
        return sum(torch.bincount(y[p]).max().item() / len(p) for p in parts) / len(parts)

    iid = dirichlet_partition(y, 8, alpha=None, seed=3)
    assert {len(p) for p in iid} == {75}
    assert dominant_share(parts) > 0.6 > 0.3 > dominant_share(iid)
    assert dominant_share(dirichlet_partition(y, 8, alpha=100.0, seed=3)) < 0.35
    with pytest.raises(ValueError, match="Invalid alpha value"):
        dirichlet_partition(y, 8, alpha=0.0, seed=0)
    with pytest.raises(ValueError, match="cannot be split among 700 workers"):
        dirichlet_partition(y, 700, alpha=1.0, seed=0)


# -------------------------------------------------------------- the per-worker gradient
def test_worker_gradient_is_the_minibatch_gradient():
    model, loss_fn, shards = _toy()
    x, y = shards[2]
    g, loss = worker_gradient(model, x, y, loss_fn, worker=2, round=7, seed=11, batch_size=5)
    idx = torch.randperm(len(x), generator=worker_generator(11, 2, 7))[:5]
    model.zero_grad()
    ref_loss = loss_fn(model(x[idx]), y[idx])
    ref_loss.backward()
    ref = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(g, ref)
    torch.testing.assert_close(loss, ref_loss.detach())
    # a pure function of (state, worker, round, seed): same inputs, same bits
    again, _ = worker_gradient(model, x, y, loss_fn, worker=2, round=7, seed=11, batch_size=5)
    assert torch.equal(g, again)
    other, _ = worker_gradient(model, x, y, loss_fn, worker=2, round=8, seed=11, batch_size=5)
    assert not torch.equal(g, other)


def test_vectorised_and_looped_gradients_agree():
    model, loss_fn, shards = _toy()
    sim = Simulator(model, loss_fn, shards, batch_size=4, vectorize=True)
    a, la = sim.gradients(range(5))
    sim.vectorize = False
    b, lb = sim.gradients(range(5))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(la, lb)


def test_auto_falls_back_to_a_loop_when_vmap_cannot_run_the_model():
    g = torch.Generator().manual_seed(0)
    shards = [(torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g))
              for _ in range(3)]

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))

    with pytest.raises(RuntimeError):  # BatchNorm's in-place running-stat update
        Simulator(make(), nn.functional.cross_entropy, shards, batch_size=4,
                  vectorize=True).step()
    auto = Simulator(make(), nn.functional.cross_entropy, shards, batch_size=4)
    loop = Simulator(make(), nn.functional.cross_entropy, shards, batch_size=4,
                     vectorize=False)
    auto.run(2)
    loop.run(2)
    assert auto.vectorize is False
    for p, q in zip(auto.model.parameters(), loop.model.parameters()):
        assert torch.equal(p, q)


def test_full_shard_batches_of_unequal_size_use_the_loop():
    model, loss_fn, _ = _toy()
    x = torch.randn(20, 4)
    y = torch.randint(0, 3, (20,))
    shards = [(x[:7], y[:7]), (x[7:], y[7:])]
    sim = Simulator(model, loss_fn, shards, batch_size=None)
    G, _ = sim.gradients([0, 1])
    for i, (xs, ys) in enumerate(shards):
        model.zero_grad()
        loss_fn(model(xs), ys).backward()
        torch.testing.assert_close(G[i], torch.cat([p.grad.flatten() for p in model.parameters()]))


# ------------------------------------------------------------------------------- rounds
def test_one_round_is_attack_then_aggregate_then_step():
    model, loss_fn, shards = _toy()
    start = [p.detach().clone() for p in model.parameters()]
    sim = Simulator(model, loss_fn, shards, TrimmedMean(f=2),
                    lambda p: torch.optim.SGD(p, lr=0.3), byzantine=[1, 3],
                    attack=SignFlipping(), batch_size=6, seed=5)
    sim.step()
    G = torch.stack([worker_gradient(model, *shards[i], loss_fn, worker=i, round=0, seed=5,
                                     batch_size=6, params=dict(zip(
                                         [k for k, _ in model.named_parameters()], start)))[0]
                     for i in (0, 2, 4)])
    X = torch.empty(5, G.shape[1])
    X[[0, 2, 4]] = G
    X[[1, 3]] = -G.mean(0)
    agg = TrimmedMean(f=2)(X)
    flat = torch.cat([p.flatten() for p in start]) - 0.3 * agg
    torch.testing.assert_close(torch.cat([p.detach().flatten() for p in model.parameters()]),
                               flat)
    torch.testing.assert_close(round_matrix(G, [0, 2, 4], [1, 3], SignFlipping(), seed=5,
                                            round=0), X)


def test_runs_are_deterministic_under_a_seed():
    def run(seed):
        sim = Simulator.from_workload(DigitsMLP(hidden=16), 6, alpha=0.5, seed=seed,
                                      byzantine=1, attack=ATTACKS["gaussian"](),
                                      aggregator=CoordinateMedian(), batch_size=16)
        h = sim.run(4, eval_every=2)
        return h, torch.cat([p.detach().flatten() for p in sim.model.parameters()])

    (h1, p1), (h2, p2), (_, p3) = run(0), run(0), run(1)
    assert torch.equal(p1, p2) and h1.train_loss == h2.train_loss
    assert h1.accuracy[1::2] == h2.accuracy[1::2]
    assert not torch.equal(p1, p3)
    assert h1.rounds == [0, 1, 2, 3] and len(h1.accuracy) == 4
    assert h1.accuracy[0] != h1.accuracy[0] and 0 <= h1.accuracy[1] <= 1  # NaN off-eval
    assert h1.final_accuracy == h1.accuracy[3]


def test_worker_momentum():
    model, loss_fn, shards = _toy()
    sim = Simulator(model, loss_fn, shards, worker_momentum=0.9, batch_size=4,
                    optimizer=lambda p: torch.optim.SGD(p, lr=0.0))  # parameters fixed
    X0, _ = sim.worker_vectors()
    sim.round = 1
    X1, _ = sim.worker_vectors()
    G0, _ = sim.gradients(range(5))  # round 1's raw gradients
    sim.round = 0
    Graw0, _ = sim.gradients(range(5))
    torch.testing.assert_close(X0, 0.1 * Graw0)
    torch.testing.assert_close(X1, 0.9 * 0.1 * Graw0 + 0.1 * G0)


def test_label_flipping_sends_the_mean_of_flipped_gradients():
    model, loss_fn, shards = _toy()
    sim = Simulator(model, loss_fn, shards, byzantine=[4], attack=LabelFlipping(),
                    batch_size=5, seed=2)
    X, _ = sim.worker_vectors()
    flipped = torch.stack([worker_gradient(model, *shards[i], loss_fn, worker=i, round=0,
                                           seed=2, batch_size=5, flip_to=3)[0]
                           for i in range(4)])
    torch.testing.assert_close(X[4], flipped.mean(0))
    assert not torch.allclose(X[4], X[:4].mean(0))


def test_robust_rules_survive_an_attack_that_breaks_the_mean():
    # IPM with τ = 5 from 3 of 10 workers: the mean moves along −(5·3 − 7)/10 · ḡ, uphill
    def final_loss(aggregator):
        sim = Simulator.from_workload(LogisticRegression(), 10, seed=0, byzantine=3,
                                      attack=InnerProductManipulation(tau=5.0),
                                      aggregator=aggregator)
        return sim.run(15, eval_every=15).eval_loss[-1]

    initial = Simulator.from_workload(LogisticRegression(), 10, seed=0).evaluate()["eval_loss"]
    assert final_loss(Mean()) > initial
    for rule in (TrimmedMean(f=3), Krum(f=3), CoordinateMedian()):
        assert final_loss(rule) < 0.5 * initial, rule


# ---------------------------------------------------------------------------- bad input
def test_bad_arguments_say_what_to_do():
    model, loss_fn, shards = _toy()
    with pytest.raises(ValueError, match="no attack; pass attack="):
        Simulator(model, loss_fn, shards, byzantine=1)
    with pytest.raises(ValueError, match="f=5 Byzantine workers out of n=5"):
        Simulator(model, loss_fn, shards, byzantine=5, attack=SignFlipping())
    with pytest.raises(ValueError, match="Invalid byzantine value: 7"):
        Simulator(model, loss_fn, shards, byzantine=[7], attack=SignFlipping())
    with pytest.raises(ValueError, match="Invalid batch_size value: 0"):
        Simulator(model, loss_fn, shards, batch_size=0)
    with pytest.raises(ValueError, match=r"Invalid worker_momentum value: 1\.0"):
        Simulator(model, loss_fn, shards, worker_momentum=1.0)
    with pytest.raises(ValueError, match="Invalid split value"):
        setup_workload(DigitsMLP(), 4, split="train")
    sim = Simulator(model, loss_fn, shards, Krum(f=3), byzantine=2, attack=SignFlipping())
    with pytest.raises(ValueError, match=r"Krum requires n > 2f .*n=5, f=3"):
        sim.step()
    assert ATTACK_STREAM != 0
