import pytest
import torch

from gradkit.federated.algorithms import FedSpeed
from gradkit.federated.asynchronous import (
    async_weights,
    client_times,
    run_schedule,
    schedule,
)
from gradkit.federated.participation import FedAUWeights
from gradkit.federated.simulator import FederatedSimulator
from tests.federated.test_federated import _flat, _toy

TAU = client_times(2, 50)   # "F-50": [1, 0.5]


def test_client_times():
    assert TAU.tolist() == [1.0, 0.5]
    assert client_times(5, 80).tolist() == pytest.approx([1, 0.8, 0.6, 0.4, 0.2])


def test_fedfix_schedule_table():
    assert schedule("fedfix", TAU, 2, dt=0.5).tolist() == [[-1, 0], [0, 1], [-1, 2], [2, 3]]
    assert async_weights("fedfix", TAU, [0.5, 0.5], dt=0.5).tolist() == [1.0, 0.5]


def test_async_schedule_table():
    assert schedule("async", TAU, 2).tolist() == [[-1, 0], [0, -1], [-1, 1], [-1, 3],
                                                  [2, -1], [-1, 4]]
    assert async_weights("async", TAU, [0.5, 0.5]).tolist() == [1.5, 0.75]
    assert async_weights("async", TAU, [0.5, 0.5], mode="identical").tolist() == [1, 1]


def test_fl_schedule_is_synchronous():
    assert schedule("fl", TAU, 2).tolist() == [[0, 0], [1, 1]]
    assert async_weights("fl", TAU, [0.3, 0.7]).tolist() == [0.3, 0.7]


def test_fedbuff_schedule_and_weights():
    table = schedule("fedbuff", client_times(3, 50), 3, c=2)
    assert ((table >= 0).sum(dim=1) == 2).all()
    # c = M is FL with d = 1/M (the reference cannot run it)
    assert torch.equal(schedule("fedbuff", TAU, 2, c=2), schedule("fl", TAU, 2))
    d = async_weights("fedbuff", TAU, [0.5, 0.5], table=schedule("fedbuff", TAU, 4, c=1))
    freq = (schedule("fedbuff", TAU, 4, c=1) >= 0).double().mean(0)
    assert d.tolist() == pytest.approx((0.5 / freq).tolist())
    assert async_weights("fedbuff", TAU, [0.5, 0.5], mode="identical", c=2).tolist() == \
        [0.5, 0.5]


def test_fedau_weights_estimate_fedbuff_frequencies_online():
    table = schedule("fedbuff", client_times(4, 80), 200, c=2)
    w = FedAUWeights(4)
    for row in table:
        omega = w.update(row >= 0)
    freq = (table >= 0).double().mean(0)
    assert omega.tolist() == pytest.approx((1 / freq).tolist(), rel=0.05)


def test_random_time_model():
    gen = torch.Generator().manual_seed(0)
    draws = {}

    def duration(i, job):
        key = (i, job)
        if key not in draws:
            draws[key] = float(torch.empty(1).exponential_(1.0, generator=gen))
        return draws[key]
    table = schedule("async", duration, 5, n_clients=3)
    assert len(table) > 0 and ((table >= 0).sum(dim=1) == 1).all()


def test_fedfix_with_equal_times_reproduces_fl():
    tau = [0.7, 0.7, 0.7]
    fix = schedule("fedfix", tau, 3, dt=0.7)
    assert torch.equal(fix, schedule("fl", tau, 3))
    assert torch.equal(async_weights("fedfix", tau, [1 / 3] * 3, dt=0.7),
                       async_weights("fl", tau, [1 / 3] * 3))
    finals = []
    for table in (fix, None):
        model, loss, clients = _toy(n_clients=3)
        sim = FederatedSimulator(model, loss, clients, local_steps=2, batch_size=4, seed=2,
                                 weighting="uniform")
        if table is None:
            sim.run(len(fix))
        else:
            run_schedule(sim, table, torch.full((3,), 1 / 3, dtype=torch.float64))
        finals.append(_flat(model))
    assert torch.allclose(finals[0], finals[1], atol=1e-12)


def test_delayed_contributions_use_stale_models():
    # client 0 of the Async table contributes at step 1 from model 0: the update is the one
    # computed from the initial model, whatever the server did at step 0
    table = schedule("async", TAU, 2)
    d = async_weights("async", TAU, [0.5, 0.5])
    model, loss, clients = _toy(n_clients=2)
    sim = FederatedSimulator(model, loss, clients, local_steps=2, batch_size=None)
    w0 = dict(zip(sim.names, [p.detach().clone() for p in sim.params]))
    sim.round = 1  # client 0's local work in step 1, from the initial model
    stale, _ = sim._train([0], w0, vectorized=False)
    sim.round = 0
    records = run_schedule(sim, table[:2], d)
    assert records[1]["participants"] == [0]
    model1, _, _ = _toy(n_clients=2)
    sim1 = FederatedSimulator(model1, loss, clients, local_steps=2, batch_size=None)
    run_schedule(sim1, table[:1], d)
    assert torch.allclose(_flat(model), _flat(model1) + 1.5 * stale[0], atol=1e-12)


def test_bad_input():
    with pytest.raises(ValueError, match="Invalid scheme"):
        schedule("sync", TAU, 2)
    with pytest.raises(ValueError, match="needs dt"):
        schedule("fedfix", TAU, 2)
    with pytest.raises(ValueError, match="Invalid c value"):
        schedule("fedbuff", TAU, 2, c=3)
    with pytest.raises(ValueError, match="Invalid client times"):
        schedule("async", [1.0, 0.0], 2)
    model, loss, clients = _toy(n_clients=2)
    sim = FederatedSimulator(model, loss, clients, algorithm=FedSpeed())
    with pytest.raises(ValueError, match="keeps per-client server state"):
        run_schedule(sim, schedule("fl", TAU, 2), torch.ones(2))
