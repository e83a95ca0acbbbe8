"""Gradient coding and sequential gradient coding: exact decoding, KATs, validation."""

import itertools
import math

import pytest
import torch

from gradkit.distributed.coding import (
    Contribution,
    CyclicRepetitionCode,
    FractionalRepetitionCode,
    GradientCodingScheme,
    MultiplexedSGC,
    SelectiveRepeatSGC,
    Task,
    UndecodableError,
    simulate_coded,
)
from gradkit.distributed.stragglers import BurstyStragglers, bursty_admits


def _partials(k, d=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(k, d, generator=gen, dtype=torch.float64)


def _codes(max_n=8):
    for n in range(1, max_n + 1):
        for s in range(n):
            yield CyclicRepetitionCode(n, s)
            if n % (s + 1) == 0:
                yield FractionalRepetitionCode(n, s)


# ---------------------------------------------------------------------------- base codes


def test_frc_kat_n4_s1():
    code = FractionalRepetitionCode(4, 1)
    expected = torch.tensor(
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.float64
    )
    assert torch.equal(code.B, expected)
    # stragglers {2, 3} in the spec's 1-based numbering are workers 1 and 2 here
    a = code.decode([0, 3])
    assert torch.equal(a, torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    assert torch.equal(a @ code.B, torch.ones(4, dtype=torch.float64))
    for group in ([0, 1], [2, 3]):
        alive = [i for i in range(4) if i not in group]
        with pytest.raises(UndecodableError, match=f"group {group[0] // 2}"):
            code.decode(alive)


def test_frc_takes_first_responder_per_group():
    code = FractionalRepetitionCode(6, 2)
    a = code.decode([4, 1, 0, 3, 5])
    assert torch.equal(a, torch.tensor([0.0, 1, 0, 0, 1, 0], dtype=torch.float64))


def test_cyclic_structure():
    for n, s in [(5, 2), (7, 3), (4, 3), (6, 0)]:
        code = CyclicRepetitionCode(n, s, seed=3)
        for i in range(n):
            assert code.partitions(i) == sorted((i + j) % n for j in range(s + 1))
            assert code.B[i, i] == 1.0
        # the rows span a space containing 1: the full set decodes
        assert torch.allclose(code.decode(range(n)) @ code.B, torch.ones(n, dtype=torch.float64))
        assert code.load == (s + 1) / n
    assert torch.equal(CyclicRepetitionCode(6, 2, seed=1).B, CyclicRepetitionCode(6, 2, seed=1).B)
    other = CyclicRepetitionCode(6, 2, seed=2).B
    assert not torch.equal(CyclicRepetitionCode(6, 2, seed=1).B, other)


@pytest.mark.parametrize("code", list(_codes()), ids=repr)
def test_decode_exact_for_every_straggler_set(code):
    """Every set of at most s stragglers, in two arrival orders: Σ a_i f_i equals Σ_j h_j."""
    h = _partials(code.k)
    full = h.sum(0)
    messages = code.encode(h)
    for v in range(code.s + 1):
        for stragglers in itertools.combinations(range(code.n), v):
            alive = [i for i in range(code.n) if i not in stragglers]
            for order in (alive, alive[::-1]):
                a = code.decode(order)
                assert torch.all(a[list(stragglers)] == 0)
                decoded = code.combine({i: messages[i] for i in order})
                assert (decoded - full).abs().max().item() <= 1e-10
                assert (a @ messages - full).abs().max().item() <= 1e-10


def test_decode_more_than_s_stragglers():
    # FRC still decodes while every group has a responder, cyclic needs n - s responders
    frc = FractionalRepetitionCode(6, 1)
    assert torch.equal(frc.decode([0, 2, 4]) @ frc.B, torch.ones(6, dtype=torch.float64))
    crc = CyclicRepetitionCode(6, 2)
    with pytest.raises(UndecodableError, match="needs any 4 responders, got 3"):
        crc.decode([0, 2, 4])
    with pytest.raises(UndecodableError):
        crc.decode([])


def test_code_validation():
    with pytest.raises(ValueError, match=r"Invalid s value: 4 .*workers 4"):
        CyclicRepetitionCode(4, 4)
    with pytest.raises(ValueError, match="Invalid s value: -1"):
        FractionalRepetitionCode(4, -1)
    with pytest.raises(ValueError, match="Invalid n value: 0"):
        CyclicRepetitionCode(0, 0)
    with pytest.raises(ValueError, match=r"s \+ 1 to divide n = 5.*CyclicRepetitionCode"):
        FractionalRepetitionCode(5, 1)
    code = FractionalRepetitionCode(4, 1)
    with pytest.raises(ValueError, match="responder 4 out of range"):
        code.decode([0, 4])
    with pytest.raises(ValueError, match="distinct"):
        code.decode([0, 0, 2])
    with pytest.raises(ValueError, match="expected 4 partial gradients"):
        code.encode(torch.zeros(3, 2))


# ---------------------------------------------------------------------------- sequential


def _run(scheme, jobs, pattern, d=3, seed=0):
    h = torch.randn(
        jobs, scheme.num_partitions, d, generator=torch.Generator().manual_seed(seed),
        dtype=torch.float64,
    )
    run = simulate_coded(scheme, lambda job, p: h[job, p], stragglers=pattern)
    assert len(run.gradients) == jobs
    err = max((g - f).abs().max().item() for g, f in zip(run.gradients, h.sum(1)))
    return run, err


@pytest.mark.parametrize(
    ("B", "W", "lam", "s"), [(1, 2, 2, 1), (2, 5, 3, 1), (1, 3, 4, 2), (3, 4, 3, 2)]
)
def test_sr_sgc_parameters(B, W, lam, s):
    scheme = SelectiveRepeatSGC(n=6, B=B, W=W, lam=lam)
    assert scheme.s == s == math.ceil(B * lam / (W - 1 + B))
    assert scheme.T == B
    assert scheme.load == (s + 1) / 6


def test_sr_sgc_kat_one_repeat():
    """(B, W, λ) = (1, 2, 2), n = 4 → s = 1; s + 1 = 2 stragglers in round 2 → exactly one
    repeat (the lowest index, worker 0) in round 3, and job 2 decodes at the end of round 3."""
    scheme = SelectiveRepeatSGC(n=4, B=1, W=2, lam=2, jobs=5)
    pattern = torch.zeros(6, 4, dtype=torch.bool)
    pattern[2, [0, 1]] = True
    run, err = _run(scheme, 5, pattern)
    assert err <= 1e-12
    assert run.waited_for_all == []
    assert torch.equal(run.stragglers, pattern)
    assert [t[0].job for t in scheme.tasks(3)] == [2, 3, 3, 3]
    contributions = scheme.decode(2)
    assert Contribution(3, 0, 0, 1.0) in contributions
    assert {c.round for c in contributions} == {2, 3}
    # the other rounds had no repeat
    for r in (0, 1, 2, 4):
        assert [t[0].job for t in scheme.tasks(r)] == [r] * 4


def test_sr_sgc_busy_repeaters_count_as_missing():
    """The later version of the rule: a worker busy repeating job t - B is missing for job t.

    (B, W, λ) = (1, 3, 3), n = 4 → s = 1, FRC groups {0, 1}, {2, 3}. Round 1: workers 1, 2
    straggle → worker 1 repeats job 1 in round 2. Round 2: worker 0 straggles, so job 2 has
    results from workers 2 and 3 only; counting stragglers alone (v = 1 = s) would leave group
    {0, 1} silent, counting the busy worker 1 as well (v = 2) makes worker 0 repeat job 2.
    """
    scheme = SelectiveRepeatSGC(n=4, B=1, W=3, lam=3, jobs=4)
    assert scheme.s == 1
    pattern = torch.zeros(5, 4, dtype=torch.bool)
    pattern[1, [1, 2]] = True
    pattern[2, 0] = True
    run, err = _run(scheme, 4, pattern)
    assert err <= 1e-12 and run.waited_for_all == []
    assert [t[0].job for t in scheme.tasks(2)] == [2, 1, 2, 2]
    assert [t[0].job for t in scheme.tasks(3)] == [2, 3, 3, 3]
    assert {(c.round, c.worker) for c in scheme.decode(2)} == {(2, 2), (3, 0)}


def test_msgc_load_and_fractions():
    for n, B, W, lam in [(6, 1, 2, 2), (5, 2, 5, 3), (4, 1, 3, 4), (6, 3, 4, 0)]:
        scheme = MultiplexedSGC(n, B, W, lam, jobs=2 * (W + B))
        if lam < n:
            expected = (lam + 1) * (W - 1 + B) / (n * (B + (W - 1) * (lam + 1)))
        else:
            expected = (W - 1 + B) / (n * (W - 1))
        assert scheme.load == pytest.approx(expected, rel=1e-12)
        fractions = scheme.partition_fractions()
        assert fractions.sum().item() == pytest.approx(1.0, rel=1e-12)
        assert scheme.T == W - 2 + B and scheme.slots == W - 1 + B
        for r in range(scheme.T + 1):
            scheme.tasks(r)
            scheme.record(r, [])
        tasks = scheme.tasks(scheme.T + 1)
        # steady state, nobody straggling: all W - 1 + B mini-tasks busy, except that with
        # λ = n there is no D2 data and the B repeat slots idle
        busy = expected if lam < n else expected * (W - 1) / (W - 1 + B)
        for row in tasks:
            work = sum(fractions[list(t.partitions)].sum().item() for t in row if t is not None)
            assert work == pytest.approx(busy, rel=1e-12)


def test_msgc_redoes_lost_d1_chunk():
    """n = 3, (B, W, λ) = (1, 3, 1): worker 0 straggles in round 1, losing chunk 1 of job 0
    (and chunk 0 of job 1); in its D2 slot for job 0 (round 2) it redoes that chunk."""
    scheme = MultiplexedSGC(3, 1, 3, 1, jobs=3)
    pattern = torch.zeros(scheme.total_rounds, 3, dtype=torch.bool)
    pattern[1, 0] = True
    run, err = _run(scheme, 3, pattern)
    assert err <= 1e-12 and run.waited_for_all == []
    task = scheme.tasks(2)[0][2]  # round 2, worker 0, slot 2 = job 0's D2 slot
    assert task == Task(0, (1,), (1.0,))
    assert scheme.tasks(2)[1][2].partitions != (1 * 2 + 1,)  # worker 1 does its D2 task
    assert len(scheme.tasks(2)[1][2].partitions) == 2  # (3, 1) code: λ + 1 partitions


@pytest.mark.parametrize("cls", [SelectiveRepeatSGC, MultiplexedSGC])
@pytest.mark.parametrize(
    ("n", "B", "W", "lam"), [(4, 1, 2, 2), (5, 2, 5, 3), (6, 1, 3, 4), (5, 3, 4, 5)]
)
def test_sequential_exact_under_random_bursty_patterns(cls, n, B, W, lam):
    if cls is SelectiveRepeatSGC and (W - 1) % B:
        pytest.skip("SR-SGC needs B | W - 1")
    jobs = 12
    for seed in range(3):
        pattern = BurstyStragglers(n, B, W, lam, p=0.6, p_continue=0.8, seed=seed).sample(
            jobs + W + B
        )
        assert pattern.any()
        run, err = _run(cls(n, B, W, lam, jobs=jobs), jobs, pattern, seed=seed)
        assert run.waited_for_all == []  # every bursty pattern is tolerated
        assert err <= 1e-10


def test_pattern_outside_model_waits_for_all():
    scheme = SelectiveRepeatSGC(n=4, B=1, W=2, lam=2, jobs=3)
    pattern = torch.zeros(4, 4, dtype=torch.bool)
    pattern[1, [0, 1, 2]] = True  # 3 > λ distinct stragglers in one window
    assert not bursty_admits(pattern[:1], pattern[1], 1, 2, 2)
    run, err = _run(scheme, 3, pattern)
    assert run.waited_for_all == [1]
    assert not run.stragglers[1].any()
    assert err <= 1e-12


def test_gc_scheme_baseline_tolerates_exactly_s():
    code = FractionalRepetitionCode(6, 1)
    scheme = GradientCodingScheme(code, jobs=3)
    assert scheme.admits([0, 2, 4])  # one per group: still decodable
    assert not scheme.admits([0, 1])  # a silent group
    pattern = torch.zeros(3, 6, dtype=torch.bool)
    pattern[0, 3] = True
    pattern[1, [4, 5]] = True
    run, err = _run(scheme, 3, pattern)
    assert run.waited_for_all == [1] and err <= 1e-12
    # "at most s" (not the reference's "< s"): one straggler with s = 1 is decoded in round 0
    assert run.stragglers[0, 3]


def test_simulate_with_delays_durations():
    scheme = SelectiveRepeatSGC(n=4, B=1, W=2, lam=2, jobs=4)
    delays = torch.tensor(
        [[1.0, 1.0, 1.0, 1.0], [1.0, 5.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0],
         [1.0, 1.0, 1.0, 1.05]], dtype=torch.float64,
    )
    h = torch.randn(4, scheme.num_partitions, 2, dtype=torch.float64)
    run = simulate_coded(scheme, lambda j, p: h[j, p], delays=delays, mu=0.1)
    assert run.stragglers[1].tolist() == [False, True, False, False]
    assert run.durations.tolist() == [1.0, pytest.approx(1.1), 1.0, 1.0, 1.05]
    assert max((g - f).abs().max().item() for g, f in zip(run.gradients, h.sum(1))) <= 1e-12


def test_scheme_validation_and_order():
    with pytest.raises(ValueError, match=r"Invalid W value: 4 .*B = 2 to divide W - 1 = 3"):
        SelectiveRepeatSGC(4, 2, 4, 1)
    with pytest.raises(ValueError, match=r"Invalid B value: 3 .*B < W = 3"):
        MultiplexedSGC(4, 3, 3, 1)
    with pytest.raises(ValueError, match="Invalid lam value: 5"):
        MultiplexedSGC(4, 1, 3, 5)
    with pytest.raises(ValueError, match="Invalid code value"):
        SelectiveRepeatSGC(4, 1, 2, 2, code="mds")
    scheme = SelectiveRepeatSGC(4, 1, 2, 2, jobs=2)
    with pytest.raises(ValueError, match="next round is 0"):
        scheme.tasks(1)
    with pytest.raises(ValueError, match="after tasks"):
        scheme.record(0, [])
    scheme.tasks(0)
    scheme.record(0, [])
    with pytest.raises(ValueError, match="record it first"):
        scheme.decode(0)
    with pytest.raises(ValueError, match="jobs=None"):
        _ = SelectiveRepeatSGC(4, 1, 2, 2).total_rounds
