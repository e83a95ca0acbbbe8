import math

import pytest
import torch
from torch import nn

from gradkit.bench.workloads import DigitsMLP
from gradkit.distributed.aggregators import CoordinateMedian
from gradkit.federated.algorithms import FedAvg, FedProx, FedSpeed
from gradkit.federated.participation import (
    Bernoulli,
    FedAUWeights,
    FullParticipation,
    UniformSampling,
)
from gradkit.federated.partition import partition, quantity_skew_partition
from gradkit.federated.simulator import FederatedSimulator
from gradkit.optim import AdaGradNorm

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


def _toy(n_clients=6, per_client=10, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_clients * per_client, 4, generator=g, dtype=dtype)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    clients = [(x[i::n_clients], y[i::n_clients]) for i in range(n_clients)]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    return model, nn.functional.cross_entropy, clients


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ------------------------------------------------------------------------------ FedAU
def _fedau_trace(schedule, rounds, cutoff):
    w = FedAUWeights(1, cutoff=cutoff)
    out = {}
    for t in range(1, rounds + 1):
        part = t in schedule
        omega = w.update(torch.tensor([part]))
        if part:
            out[t] = float(omega[0])
    return out


def test_fedau_known_answers():
    assert _fedau_trace({1, 4, 5, 9}, 9, None) == pytest.approx({1: 1, 4: 1, 5: 2, 9: 5 / 3})
    assert _fedau_trace({1, 4, 5, 9}, 9, 2) == pytest.approx({1: 1, 4: 1.5, 5: 4 / 3,
                                                             9: 7 / 5})


def test_fedau_estimates_inverse_probability():
    p = torch.tensor([0.1, 0.25, 0.5, 1.0])
    part, w = Bernoulli(p), FedAUWeights(4)
    for t in range(4000):
        omega = w.update(part.sample(4, t, seed=3))
    assert omega.tolist() == pytest.approx((1 / p).tolist(), rel=0.1)


def test_fedau_full_participation_equals_fedavg():
    runs = []
    for weighting in ("uniform", "fedau"):
        model, loss, clients = _toy()
        sim = FederatedSimulator(model, loss, clients, weighting=weighting, local_steps=3,
                                 batch_size=4, seed=1)
        sim.run(4)
        runs.append(_flat(model))
    assert torch.equal(runs[0], runs[1])


def test_known_and_fedau_weights_scale_by_n():
    # one round with two of four clients: "known" gives (1/N) Σ Δ_i / p_i
    model, loss, clients = _toy(n_clients=4)
    p = torch.tensor([0.5, 0.5, 0.25, 1.0], dtype=torch.float64)
    sim = FederatedSimulator(model, loss, clients, participation=Bernoulli(p),
                             weighting="known", seed=5, batch_size=None, local_steps=2)
    w0 = _flat(model)
    mask = sim.participation.sample(4, 0, 5)
    ids = torch.nonzero(mask).flatten().tolist()
    deltas, _, _ = sim.local_updates(ids)
    expected = w0 + sum(deltas[i] / p[i] for i in ids) / 4
    sim.step()
    assert ids and torch.allclose(_flat(model), expected, atol=1e-12)


# ---------------------------------------------------------------------------- FedSpeed
class _Point(nn.Module):
    def __init__(self, w0):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w0], dtype=torch.float64))

    def forward(self, x):
        return self.w.expand(len(x))


def _half_square(out, y):
    return 0.5 * (out ** 2).mean()


def _fedspeed_1d(rho, c, rounds):
    model = _Point(1.0)
    clients = [(torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1))]
    algo = FedSpeed(rho=rho, lamb=c)
    sim = FederatedSimulator(model, _half_square, clients, algorithm=algo, local_steps=1,
                             batch_size=None,
                             local_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    ws, hs = [], []
    for _ in range(rounds):
        sim.step()
        ws.append(float(model.w.detach()))
        hs.append(float(algo.h[0, 0]))
    return ws, hs


def test_fedspeed_1d_known_answers():
    ws, hs = _fedspeed_1d(rho=0.0, c=0.1, rounds=2)
    assert hs == pytest.approx([-0.1, -0.179], abs=1e-12)
    assert ws == pytest.approx([0.8, 0.542], abs=1e-12)
    ws, hs = _fedspeed_1d(rho=0.1, c=0.0, rounds=1)
    assert hs == pytest.approx([-0.11], abs=1e-7) and ws == pytest.approx([0.78], abs=1e-7)


def test_fedspeed_correction_doubles_first_step():
    # the reference's behaviour, kept on purpose: w_1 = w_0 + 2Δ with ρ = c = 0
    ws, hs = _fedspeed_1d(rho=0.0, c=0.0, rounds=1)
    assert hs == pytest.approx([-0.1]) and ws == pytest.approx([1.0 + 2 * -0.1])


def test_fedspeed_clips_the_corrected_gradient():
    model = _Point(200.0)
    clients = [(torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1))]
    sim = FederatedSimulator(model, _half_square, clients,
                             algorithm=FedSpeed(rho=0.0, lamb=0.0), local_steps=1,
                             batch_size=None,
                             local_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    sim.step()  # gradient 200 clipped to 10: Δ = −1, w_1 = 200 + 2·(−1)
    assert float(model.w.detach()) == pytest.approx(198.0, abs=1e-4)


# ----------------------------------------------------------------------- FedAvg itself
def test_fedavg_matches_independent_reference():
    model, loss, clients = _toy(n_clients=3)
    w0 = [p.detach().clone() for p in model.parameters()]
    sim = FederatedSimulator(model, loss, clients, batch_size=None, local_steps=3,
                             local_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.2))
    sim.step()
    # reference: each client runs 3 full-batch GD steps with autograd; the server averages
    finals = []
    for x, y in clients:
        ref = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        with torch.no_grad():
            for p, v in zip(ref.parameters(), w0):
                p.copy_(v)
        for _ in range(3):
            ref.zero_grad()
            nn.functional.cross_entropy(ref(x), y).backward()
            with torch.no_grad():
                for p in ref.parameters():
                    p -= 0.2 * p.grad
        finals.append(_flat(ref))
    assert torch.allclose(_flat(model), torch.stack(finals).mean(0), atol=1e-12)


def test_server_momentum_is_a_torch_optimizer_on_the_pseudo_gradient():
    def run(server):
        model, loss, clients = _toy()
        sim = FederatedSimulator(model, loss, clients, server_optimizer=server, seed=2)
        traj = []
        for _ in range(3):
            before = _flat(model)
            sim.step()
            traj.append(_flat(model) - before)
        return traj
    plain = run(None)
    avgm = run(lambda ps: torch.optim.SGD(ps, lr=1.0, momentum=0.9))
    assert torch.allclose(plain[0], avgm[0], atol=1e-12)  # first step: no momentum yet
    assert not torch.allclose(plain[2], avgm[2], atol=1e-6)
    adam = run(lambda ps: torch.optim.Adam(ps, lr=0.01))
    assert torch.allclose(adam[0].abs().max(), torch.tensor(0.01, dtype=torch.float64))


def test_robust_aggregator_is_the_server_rule():
    model, loss, clients = _toy(n_clients=5)
    sim = FederatedSimulator(model, loss, clients, aggregator=CoordinateMedian(),
                             batch_size=None, local_steps=2)
    w0 = _flat(model)
    deltas, _, _ = sim.local_updates(list(range(5)))
    sim.step()
    expected = w0 + torch.stack([deltas[i] for i in range(5)]).median(dim=0).values
    assert torch.allclose(_flat(model), expected, atol=1e-12)


# ------------------------------------------------------------ determinism, vmap ≡ loop
@pytest.mark.parametrize("algorithm", [FedAvg(), FedProx(mu=0.1), FedSpeed()],
                         ids=["fedavg", "fedprox", "fedspeed"])
def test_vmap_path_equals_loop_path(algorithm):
    finals = []
    for vectorize in (True, False):
        model, loss, clients = _toy(n_clients=8)
        clients[3] = (clients[3][0][:3], clients[3][1][:3])  # unequal sizes: unequal K_i
        sim = FederatedSimulator(
            model, loss, clients, algorithm=type(algorithm)(**vars(algorithm)) if not
            isinstance(algorithm, FedSpeed) else FedSpeed(), participation=Bernoulli(0.6),
            weighting="fedau", local_epochs=2, batch_size=4, seed=4, vectorize=vectorize,
            local_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.05))
        sim.run(3)
        finals.append(_flat(model))
    assert torch.allclose(finals[0], finals[1], atol=1e-10, rtol=0)


def test_deterministic_under_a_seed():
    def run(seed):
        sim = FederatedSimulator.from_workload(
            DigitsMLP(), 12, scheme="dirichlet", alpha=0.3, seed=seed,
            participation=UniformSampling(4), local_steps=2)
        history = sim.run(3)
        return _flat(sim.model), history.train_loss
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(a[0], c[0])


def test_any_torch_optimizer_locally_loops_when_not_elementwise():
    finals = []
    for vectorize in ("auto", False):
        model, loss, clients = _toy()
        sim = FederatedSimulator(model, loss, clients, vectorize=vectorize, local_steps=3,
                                 local_optimizer=lambda ps: AdaGradNorm(ps, lr=0.1))
        sim.run(2)
        finals.append(_flat(model))
    assert torch.equal(finals[0], finals[1])
    assert sim._use_vmap() is False


# --------------------------------------------------------------------------- bad input
def test_failing_and_nan_clients_are_excluded_and_reported():
    model, loss, clients = _toy(n_clients=5)
    good = [clients[0], clients[3], clients[4]]
    clients[1] = (torch.randn(10, 7, dtype=torch.float64), clients[1][1])  # wrong features
    clients[2] = (clients[2][0].clone().fill_(float("nan")), clients[2][1])
    for vectorize in (True, False):
        model, _, _ = _toy(n_clients=5)
        sim = FederatedSimulator(model, loss, clients, batch_size=None, local_steps=2,
                                 vectorize=vectorize)
        record = sim.step()
        assert sorted(record["failed"]) == [1, 2]
        assert "RuntimeError" in record["failed"][1] and "non-finite" in record["failed"][2]
        assert record["participants"] == [0, 3, 4]
        assert [(r, i) for r, i, _ in sim.failures] == [(0, 1), (0, 2)]
        ref_model, _, _ = _toy(n_clients=5)
        FederatedSimulator(ref_model, loss, good, batch_size=None, local_steps=2).step()
        assert torch.allclose(_flat(model), _flat(ref_model), atol=1e-12)


def test_empty_client_partition_is_refused_by_id():
    model, loss, clients = _toy(n_clients=4)
    clients[2] = (clients[2][0][:0], clients[2][1][:0])
    with pytest.raises(ValueError, match=r"clients \[2\] have no data"):
        FederatedSimulator(model, loss, clients)


def test_round_without_participants_is_a_no_op():
    model, loss, clients = _toy()
    sim = FederatedSimulator(model, loss, clients, participation=Bernoulli(1e-9))
    w0 = _flat(model)
    record = sim.step()
    assert record["participants"] == [] and math.isnan(record["train_loss"])
    assert torch.equal(_flat(model), w0)


@pytest.mark.parametrize("make, message", [
    (lambda: FedProx(mu=-1), "Invalid mu value"),
    (lambda: FedSpeed(rho=-0.1), "Invalid rho value"),
    (lambda: FedSpeed(alpha=2), "Invalid alpha value"),
    (lambda: Bernoulli([0.5, 0.0]), "Invalid participation probabilities"),
    (lambda: UniformSampling(0), "Invalid clients_per_round value"),
    (lambda: FedAUWeights(3, cutoff=0), "Invalid cutoff value"),
])
def test_invalid_hyperparameters(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_invalid_simulator_arguments():
    model, loss, clients = _toy()
    with pytest.raises(ValueError, match="Invalid weighting value"):
        FederatedSimulator(model, loss, clients, weighting="oracle")
    with pytest.raises(ValueError, match="needs a participation model with probabilities"):
        FederatedSimulator(model, loss, clients, weighting="known",
                           participation=FullParticipation())
    with pytest.raises(ValueError, match="Invalid local_steps value"):
        FederatedSimulator(model, loss, clients, local_steps=0)


# --------------------------------------------------------------------------- partitions
def test_partitions_cover_the_data_once_and_are_deterministic():
    labels = torch.arange(200) % 10
    for scheme, kw in [("iid", {}), ("dirichlet", {"alpha": 0.1}), ("quantity", {"beta": 0.3})]:
        parts = partition(labels, 17, scheme, seed=3, **kw)
        assert len(parts) == 17 and min(len(p) for p in parts) >= 1
        assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(200))
        again = partition(labels, 17, scheme, seed=3, **kw)
        assert all(torch.equal(a, b) for a, b in zip(parts, again))
    sizes = [len(p) for p in quantity_skew_partition(1000, 10, 0.2, seed=0)]
    assert max(sizes) > 5 * min(sizes)  # strongly skewed sizes


def test_partition_bad_input():
    labels = torch.arange(20) % 2
    with pytest.raises(ValueError, match="Invalid partition scheme"):
        partition(labels, 4, "pathological")
    with pytest.raises(ValueError, match="needs alpha"):
        partition(labels, 4, "dirichlet")
    with pytest.raises(ValueError, match="cannot be split"):
        quantity_skew_partition(3, 4, 0.5, seed=0)
