"""Ray runtime on a real local Ray instance (``ray.init(num_cpus=2)``, once per module)."""

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradkit.distributed.aggregators import CoordinateMedian, Mean
from gradkit.distributed.attacks import LabelFlipping, SignFlipping
from gradkit.distributed.coding import (
    FractionalRepetitionCode,
    SelectiveRepeatSGC,
    simulate_coded,
)
from gradkit.distributed.ray_runtime import RayParameterServer, connect, run_coded
from gradkit.distributed.simulator import Simulator
from gradkit.errors import MissingExtraError

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="needs ray: pip install gradkit[ray]")

N, SEED, BATCH, LR = 4, 5, 8, 0.1


def make_model():
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def make_shards():
    shards = []
    for i in range(N):
        g = torch.Generator().manual_seed(200 + i)
        shards.append((torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)))
    return shards


def sgd(params):
    return torch.optim.SGD(params, lr=LR)


def simulate(rounds, aggregator, byzantine=(), attack=None):
    model = make_model()
    sim = Simulator(model, F.cross_entropy, make_shards(), aggregator, optimizer=sgd,
                    byzantine=list(byzantine), attack=attack, batch_size=BATCH, seed=SEED,
                    vectorize=False)
    for _ in range(rounds):
        sim.step()
    return model.state_dict()


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    # the test functions travel to the actors by value (the tests package is not importable
    # from the actors' working directory)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    connect(num_cpus=2, include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()


# ------------------------------------------------------------------ no cluster needed


def test_without_ray_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'gradkit\[ray\]'"):
        connect()


@needs_ray
def test_unreachable_cluster_is_a_clear_error():
    with pytest.raises(ConnectionError, match=r"Could not reach a Ray cluster at '127\.0\.0\.1:1'"
                                              r".*ray start --head"):
        connect("127.0.0.1:1", timeout=2.0)  # checked before ray.init, which retries for minutes


def test_validation():
    shards = make_shards()
    with pytest.raises(ValueError, match="Invalid wait_for value: 5"):
        RayParameterServer(make_model, F.cross_entropy, shards, wait_for=5)
    with pytest.raises(ValueError, match=r"Invalid byzantine value: 4 .*indices in 0\.\.3"):
        RayParameterServer(make_model, F.cross_entropy, shards, byzantine=[4],
                           attack=SignFlipping())
    with pytest.raises(ValueError, match="no attack"):
        RayParameterServer(make_model, F.cross_entropy, shards, byzantine=[1])
    with pytest.raises(ValueError, match="flipped"):
        RayParameterServer(make_model, F.cross_entropy, shards, byzantine=[1],
                           attack=LabelFlipping())
    with pytest.raises(ValueError, match="do not combine code="):
        RayParameterServer(make_model, F.cross_entropy, shards, Mean(),
                           code=FractionalRepetitionCode(4, 1))
    with pytest.raises(ValueError, match="n = 6 workers"):
        RayParameterServer(make_model, F.cross_entropy, shards,
                           code=FractionalRepetitionCode(6, 1))
    with pytest.raises(ValueError, match="Invalid timeout value: 0"):
        RayParameterServer(make_model, F.cross_entropy, shards, timeout=0)


# ------------------------------------------------------------------ real Ray instance


@needs_ray
def test_synchronous_rounds_equal_simulator(ray_instance):
    """wait_for = n, worker 3 Byzantine: bitwise the simulator's rounds (the workers run the
    simulator's worker_gradient, the server its attack, aggregation and optimizer step)."""
    with RayParameterServer(make_model, F.cross_entropy, make_shards(), CoordinateMedian(),
                            optimizer=sgd, byzantine=[3], attack=SignFlipping(),
                            batch_size=BATCH, seed=SEED) as server:
        reports = server.run(2)
        got = server.state_dict()
    assert [sorted(r.responders) for r in reports] == [[0, 1, 2, 3]] * 2
    assert all(r.stragglers == [] and r.crashed == [] for r in reports)
    want = simulate(2, CoordinateMedian(), byzantine=[3], attack=SignFlipping())
    assert any(not torch.equal(want[k], v) for k, v in make_model().state_dict().items())
    for k, v in want.items():
        assert torch.equal(got[k], v), k


@needs_ray
def test_gradient_coding_with_delays_and_a_crash(ray_instance):
    """FRC(4, 1): round 0, worker 1 is 3 s late → decoded without it; round 1, worker 2 crashes
    while its group partner 3 is 3 s late → the crash is seen within the round, reported, and
    the round decodes from worker 3; round 2 goes on without worker 2. Every decoded
    gradient is the exact mean of the 4 partition gradients: the model equals the simulator's
    Mean run (to float32 rounding: decoding sums the partitions in another order)."""
    delays = torch.zeros(3, N)
    delays[0, 1] = 3.0
    delays[1, 3] = 3.0
    with RayParameterServer(make_model, F.cross_entropy, make_shards(),
                            code=FractionalRepetitionCode(N, 1), optimizer=sgd, batch_size=BATCH,
                            seed=SEED, delays=delays, crashes={1: [2]}) as server:
        r0 = server.step()
        with pytest.warns(UserWarning, match="worker 2 crashed in round 1"):
            r1 = server.step()
        r2 = server.step()
        got = server.state_dict()
    assert 1 not in r0.responders and 1 in r0.stragglers
    assert r1.crashed == [2] and 2 not in r1.responders and 3 in r1.responders
    assert 2 not in r2.responders + r2.stragglers
    want = simulate(3, Mean())
    for k, v in want.items():
        assert torch.allclose(got[k], v, rtol=1e-5, atol=1e-6), k


@needs_ray
@pytest.mark.slow
def test_async_robust_rounds(ray_instance):
    """wait_for = 3 with a timeout: a slow worker is left out and stays out while busy; a
    crash is reported and the round continues with the rest."""
    delays = torch.zeros(4, N)
    delays[0, 0] = 5.0
    with RayParameterServer(make_model, F.cross_entropy, make_shards(), Mean(), optimizer=sgd,
                            batch_size=BATCH, seed=SEED, wait_for=3, timeout=20.0,
                            delays=delays, crashes={2: [3]}) as server:
        r0, r1 = server.step(), server.step()
        with pytest.warns(UserWarning, match="worker 3 crashed"):
            r2 = server.step()
    assert sorted(r0.responders) == [1, 2, 3] and r0.stragglers == [0]
    assert 0 in r1.stragglers or 0 in r1.responders  # busy until its 5 s task is done
    assert r2.crashed == [3] and 3 not in r2.responders and len(r2.responders) >= 2


def _partial(job, partition):
    return torch.full((3,), float(100 * job + partition), dtype=torch.float64)


@needs_ray
@pytest.mark.slow
def test_sequential_coding_on_ray(ray_instance):
    """SR-SGC on 4 actors, worker 1 injected 4 s later than the others in round 1: every job
    decodes to the exact sum, and to exactly what simulate_coded decodes for the straggler
    pattern Ray saw."""
    jobs = 4
    delays = torch.full((jobs + 1, N), 1.0)  # a common 1 s, so that Ray's jitter stays small
    delays[1, 1] = 5.0
    run = run_coded(SelectiveRepeatSGC(N, B=1, W=2, lam=2, jobs=jobs), _partial, delays=delays,
                    mu=0.5)
    assert run.stragglers[1, 1] and 1 not in run.waited_for_all, (run.stragglers,
                                                                  run.waited_for_all)
    assert len(run.gradients) == jobs and run.durations.shape == (jobs + 1,)
    ref = simulate_coded(SelectiveRepeatSGC(N, B=1, W=2, lam=2, jobs=jobs), _partial,
                         stragglers=run.stragglers)
    for t, (got, want) in enumerate(zip(run.gradients, ref.gradients)):
        full = sum(_partial(t, p) for p in range(N))
        assert torch.equal(got, want) and torch.equal(got, full)
