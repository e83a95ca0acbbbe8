import pytest
import torch
from torch import nn

from gradkit.federated.fedamd import FedAMD, sarah_steps
from tests.federated.test_federated import _flat, _Point, _toy


def _full_gradient(model, x, y):
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_sarah_known_answer():
    def loss(params, buffers, x, y):
        return 1.5 * params["w"].pow(2).sum()   # f(w) = (a/2) w², a = 3
    params = {"w": torch.tensor([1.0], dtype=torch.float64)}
    v0 = {"w": torch.tensor([2.0], dtype=torch.float64)}
    batch = (torch.zeros(1), torch.zeros(1))
    _, trace = sarah_steps(loss, params, {}, v0, [batch, batch], lr=0.1)
    got = [x for v, w in trace for x in (float(v["w"]), float(w["w"]))]
    assert got == pytest.approx([2, 0.8, 1.4, 0.66, 0.98, 0.562], abs=1e-12)


def test_first_round_without_anchors_is_one_gradient_step():
    model, loss, clients = _toy(n_clients=4)
    w0 = _flat(model)
    grads = torch.stack([_full_gradient(model, x, y) for x, y in clients])
    sim = FedAMD(model, loss, clients, clients_per_round=4, anchor_prob=0.0,
                 local_lr=0.1, local_steps=1,
                 server_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5))
    record = sim.step()
    assert record["anchors"] == [] and record["participants"] == [0, 1, 2, 3]
    assert torch.allclose(_flat(model), w0 - 0.5 * 0.1 * grads.mean(0), atol=1e-12)


def test_anchor_rounds_only_refresh_the_table():
    model, loss, clients = _toy(n_clients=5)
    sim = FedAMD(model, loss, clients, clients_per_round=3, anchor_prob=3, local_lr=0.1,
                 local_steps=3, batch_size=4, seed=1)
    records = [sim.step() for _ in range(3)]
    assert [bool(r["anchors"]) for r in records] == [True, False, False]
    w3, table = _flat(model), sim.table.clone()
    assert not torch.equal(w3, _flat(_toy(n_clients=5)[0]))  # the miners moved it
    record = sim.step()
    assert record["anchors"] and record["participants"] == []
    assert torch.equal(_flat(model), w3)
    for i in range(5):
        expected = _full_gradient(model, *clients[i]) if i in record["anchors"] else table[i]
        assert torch.allclose(sim.table[i], expected, atol=1e-12)


def test_one_dimensional_fedamd_round_matches_the_rule():
    # one client, f(w) = ½ w², warm-up G = w_0 = 1, K = 2: w^1 = 1 − 0.1 = 0.9,
    # v^1 = 1 + 0.9 − 1 = 0.9, w^2 = 0.9 − 0.09 = 0.81
    model = _Point(1.0)
    clients = [(torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1))]
    sim = FedAMD(model, lambda out, y: 0.5 * (out ** 2).mean(), clients, clients_per_round=1,
                 anchor_prob=0.0, local_lr=0.1, local_steps=2, batch_size=None)
    sim.step()
    assert float(model.w.detach()) == pytest.approx(0.81, abs=1e-12)


@pytest.mark.parametrize("p", [1, 1.0, 2.5, -0.1])
def test_invalid_anchor_probability(p):
    model, loss, clients = _toy()
    with pytest.raises(ValueError, match="Invalid anchor_prob value"):
        FedAMD(model, loss, clients, clients_per_round=2, anchor_prob=p)
