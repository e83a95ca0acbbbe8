import itertools
import math

import numpy as np
import pytest
import torch
from byzfl_oracle import load as load_byzfl

from gradkit.distributed.aggregators import (
    ARC,
    MDA,
    NNM,
    Aggregator,
    Bucketing,
    CenteredClipping,
    Clipping,
    CoordinateMedian,
    DropNonFinite,
    FlagAggregator,
    GeometricMedian,
    Krum,
    Mean,
    MoNNA,
    MultiKrum,
    Pipeline,
    PreAggregator,
    TrimmedMean,
    pairwise_sq_distances,
)

X3 = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]


def _inputs(dtype):
    """ByzFL's four input types: tensor, list of tensors, ndarray (and a float32 tensor)."""
    t = torch.tensor(X3, dtype=dtype)
    return [t, list(t), t.numpy()]


# --------------------------------------------------------------- ByzFL's 3×3 known answers
KAT = [
    (Mean(), [4, 5, 6]),
    (CoordinateMedian(), [4, 5, 6]),
    (TrimmedMean(f=1), [4, 5, 6]),
    (CenteredClipping(), [4, 5, 6]),
    (GeometricMedian(), [3.78788764, 4.78788764, 5.78788764]),
    (Krum(f=1), [1, 2, 3]),
    (MultiKrum(f=1), [2.5, 3.5, 4.5]),
    (MDA(f=1), [2.5, 3.5, 4.5]),
    (MoNNA(f=1, idx=1), [2.5, 3.5, 4.5]),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("agg", "expected"), KAT, ids=[repr(a) for a, _ in KAT])
def test_byzfl_3x3_known_answers(agg, expected, dtype):
    for X in _inputs(dtype):
        agg.reset()
        out = agg(X)
        assert out.dtype == dtype
        tol = 1e-8 if dtype == torch.float64 else 1e-6  # the values are given to 8 digits
        torch.testing.assert_close(out, torch.tensor(expected, dtype=dtype), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_byzfl_3x3_pre_aggregators(dtype):
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    for X in _inputs(dtype):
        torch.testing.assert_close(NNM(f=1)(X), torch.tensor(
            [[2.5, 3.5, 4.5], [2.5, 3.5, 4.5], [5.5, 6.5, 7.5]], dtype=dtype), **tol)
        torch.testing.assert_close(Clipping(c=2.0)(X), torch.tensor(
            [[0.53452248, 1.06904497, 1.60356745], [0.91168461, 1.13960576, 1.36752692],
             [1.00514142, 1.14873305, 1.29232469]], dtype=dtype), rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(ARC(f=1)(X), torch.tensor(
            [[1, 2, 3], [4, 5, 6], [4.41004009, 5.04004582, 5.67005155]], dtype=dtype),
            rtol=1e-7, atol=1e-7)


def test_geometric_median_iterates_from_zero():
    X = torch.tensor(X3, dtype=torch.float64)
    assert torch.equal(GeometricMedian(T=0)(X), torch.zeros(3, dtype=torch.float64))
    for T, value in [(1, 2.70557737), (2, 3.33382971), (3, 3.78788764)]:
        out = GeometricMedian(T=T)(X)
        torch.testing.assert_close(out, torch.tensor([value, value + 1, value + 2],
                                                     dtype=torch.float64))
    # converged from the default start, it is the true geometric median [4, 5, 6]
    torch.testing.assert_close(GeometricMedian(T=200, nu=1e-9)(X),
                               torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64))


def test_pre_aggregators_return_new_tensors():
    X = torch.tensor(X3, dtype=torch.float64)
    before = X.clone()
    for pre in (Clipping(c=2.0), ARC(f=1), NNM(f=1), Bucketing(s=2)):
        pre(X)
    torch.testing.assert_close(X, before, rtol=0, atol=0)


# ------------------------------------------------------------------------- NNA / MoNNA
def test_nna_known_answers():
    # 1-D, own x = 0, received [0, 1, 2, 100], f = 1: the 3 nearest {0, 1, 2} average to 1
    X = torch.tensor([[0.0], [1.0], [2.0], [100.0]], dtype=torch.float64)
    assert MoNNA(f=1, idx=0)(X).item() == 1.0
    # identical honest vectors, Byzantine outliers farther than the honest spread
    honest = torch.tensor([0.3, -1.2, 2.5], dtype=torch.float64)
    X = torch.cat([honest.expand(5, 3), torch.tensor([[9.0, 9, 9], [-7.0, 3, 50]])])
    torch.testing.assert_close(MoNNA(f=2, idx=1)(X), honest, rtol=0, atol=0)
    torch.testing.assert_close(NNM(f=2)(X)[:5], honest.expand(5, 3), rtol=0, atol=0)


# --------------------------------------------------------------------------- Flag (FA)
def _flag_reference(G, r, lambda_, n_its, Y0):
    """The Flag Aggregator written from the equations in d-space, with explicit columns
    (the p² pairwise columns included) and a thin SVD, as the authors' code does it."""
    p = G.shape[0]
    X = G / G.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def cols_and_J(Y):
        s = (1 - (X @ Y).square().sum(1)).abs()
        J = s.sqrt().sum()
        cols = [(s + 1e-7) ** -0.25 * X.T]
        if lambda_ > 0:
            c = lambda_ / (p * (p - 1))
            for i, j in itertools.permutations(range(p), 2):
                diff = X[i] - X[j]
                sij = (1 - (diff @ Y).square().sum()).abs()
                J = J + c * sij.sqrt()
                cols.append((c * (sij + 1e-7) ** -0.25 * diff)[:, None])
        return torch.cat(cols, dim=1), J

    Y = Y0
    M, J = cols_and_J(Y)
    for _ in range(n_its):
        if J <= 1e-10:
            break
        Y_new = torch.linalg.svd(M, full_matrices=False).U[:, :r]
        M_new, J_new = cols_and_J(Y_new)
        if not J_new < J:
            break
        decrease = J - J_new
        Y, M, J = Y_new, M_new, J_new
        if decrease <= 1e-10:
            break
    return (Y @ (Y.T @ X.sum(0))) / r


def test_flag_known_answers():
    f64 = torch.float64
    out = FlagAggregator(r=1)(torch.tensor([[3.0, 4], [6, 8], [0.3, 0.4]], dtype=f64))
    torch.testing.assert_close(out, torch.tensor([1.8, 2.4], dtype=f64))
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    agg = FlagAggregator(r=1, n_its=4, init=torch.tensor([[c], [s]], dtype=f64))
    out = agg(torch.tensor([[1.0, 0], [3, 0], [0, 5]], dtype=f64))
    torch.testing.assert_close(out, torch.tensor([2.0, 0.0], dtype=f64))
    assert not torch.allclose(out, Mean()(torch.tensor([[1.0, 0], [1, 0], [0, 1]], dtype=f64)))
    out = FlagAggregator(r=3)(torch.tensor([[2.0, 0, 0], [0, 3, 0], [0, 0, 4]], dtype=f64))
    torch.testing.assert_close(out, torch.full((3,), 1 / 3, dtype=f64))


def test_flag_identical_rows_and_rescale():
    x = torch.tensor([0.5, -2.0, 1.0, 3.0], dtype=torch.float64)
    X = x.expand(5, 4) * torch.tensor([[1.0], [2], [3], [0.5], [7]], dtype=torch.float64)
    torch.testing.assert_close(FlagAggregator()(X), 5 * x / x.norm())
    torch.testing.assert_close(FlagAggregator(rescale="mean_norm")(X),
                               5 * x / x.norm() * X.norm(dim=1).mean())


@pytest.mark.parametrize(("r", "lambda_", "n_its"), [(1, 0.0, 1), (2, 0.0, 4), (3, 0.0, 6),
                                                     (2, 3.0, 3), (1, 16.0, 2)])
def test_flag_matches_explicit_reference(r, lambda_, n_its):
    g = torch.Generator().manual_seed(r * 10 + n_its)
    G = torch.randn(6, 12, generator=g, dtype=torch.float64) + 0.5
    Y0 = torch.linalg.qr(torch.rand(12, r, generator=g, dtype=torch.float64) - 0.5).Q
    ours = FlagAggregator(r=r, lambda_=lambda_, n_its=n_its, init=Y0)(G)
    ref = _flag_reference(G, r, lambda_, n_its, Y0)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-10)


def test_flag_r_above_p_warns_and_keeps_the_reference_scale():
    G = torch.eye(3, 5, dtype=torch.float64)
    with pytest.warns(UserWarning, match="r=4 > p=3"):
        out = FlagAggregator(r=4, n_its=2)(G)
    torch.testing.assert_close(out, G.sum(0) / 4)


# ---------------------------------------------------------------------------- invariants
def _random(n=9, d=7, seed=0, dtype=torch.float64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_f_zero_reduces_to_the_mean():
    X = _random()
    mean = X.mean(0)
    for agg in (TrimmedMean(f=0), MultiKrum(f=0), MDA(f=0), MoNNA(f=0, idx=4),
                NNM(f=0) >> Mean(), NNM(f=0) >> CoordinateMedian()):
        torch.testing.assert_close(agg(X), mean, msg=repr(agg))


PERMUTATION_INVARIANT = [Mean(), CoordinateMedian(), TrimmedMean(f=2), GeometricMedian(T=5),
                         Krum(f=2), MultiKrum(f=2), CenteredClipping(tau=1.0), MDA(f=2),
                         FlagAggregator(r=2, n_its=3), NNM(f=2) >> Krum(f=2),
                         ARC(f=2) >> TrimmedMean(f=2)]


@pytest.mark.parametrize("n", [8, 9])
@pytest.mark.parametrize("agg", PERMUTATION_INVARIANT, ids=repr)
def test_permutation_invariance(agg, n):
    X = _random(n=n, seed=n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    agg.reset()
    a = agg(X)
    agg.reset()
    torch.testing.assert_close(agg(X[perm]), a, rtol=1e-10, atol=1e-10)


def test_monna_is_permutation_invariant_when_idx_follows_its_row():
    X = _random(n=8)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    where = int((perm == 5).nonzero())
    torch.testing.assert_close(MoNNA(f=3, idx=where)(X[perm]), MoNNA(f=3, idx=5)(X))


@pytest.mark.parametrize("agg", [Mean(), CoordinateMedian(), TrimmedMean(f=2), Krum(f=2),
                                 MultiKrum(f=2), MDA(f=2), MoNNA(f=2, idx=3),
                                 GeometricMedian(T=1), CenteredClipping(tau=100.0),
                                 NNM(f=2) >> Mean(), Bucketing(s=2) >> CoordinateMedian(),
                                 Clipping(c=50.0) >> Krum(f=1)], ids=repr)
def test_identical_rows_return_that_row(agg):
    x = torch.tensor([1.5, -2.0, 0.25, 4.0], dtype=torch.float64)
    torch.testing.assert_close(agg(x.expand(6, 4)), x)


def test_krum_picks_an_honest_vector_and_multikrum_drops_the_outliers():
    honest = _random(n=7, d=5) * 0.1
    X = torch.cat([honest, torch.full((2, 5), 50.0, dtype=torch.float64)])
    assert any(torch.equal(Krum(f=2)(X), h) for h in honest)
    torch.testing.assert_close(MultiKrum(f=2)(X), honest.mean(0))
    # Blanchard's k = n − f − 2 with a sum picks the same vector as the mean over k
    scores = Krum(f=2, neighbors=9 - 2 - 2).scores(X)
    D = torch.cdist(X, X).square()
    ref = torch.stack([torch.sort(D[i][torch.arange(9) != i]).values[:5].sum() for i in range(9)])
    torch.testing.assert_close(scores * 5, ref)


def test_trimmed_mean_and_median_against_sorting():
    for n in (6, 7):
        X = _random(n=n, d=50, seed=n)
        S = X.sort(dim=0).values
        torch.testing.assert_close(TrimmedMean(f=2)(X), S[2:n - 2].mean(0))
        torch.testing.assert_close(CoordinateMedian()(X), torch.quantile(X, 0.5, dim=0))


@pytest.mark.parametrize(("n", "d"), [*((n, 300) for n in (*range(1, 12), 31, 50, 64, 65)),
                                      (9, 70000)])
def test_coordinatewise_rules_against_torch_sort(n, d):
    # the sorting network (n <= 64; d = 70000 spans three column blocks), with ties, and
    # torch.sort above 64 rows
    g = torch.Generator().manual_seed(n)
    X = torch.randint(-3, 4, (n, d), generator=g).double()  # many ties
    X[:, :5] = torch.randn(n, 5, generator=g, dtype=torch.float64)
    S = X.sort(dim=0).values
    torch.testing.assert_close(CoordinateMedian()(X), torch.quantile(X, 0.5, dim=0),
                               rtol=0, atol=0)
    f = (n - 1) // 2
    torch.testing.assert_close(TrimmedMean(f=f)(X), S[f:n - f].mean(0), rtol=0, atol=0)
    if n > 4:
        torch.testing.assert_close(TrimmedMean(f=2)(X), S[2:n - 2].mean(0), rtol=0, atol=0)


def test_mda_against_brute_force():
    X = _random(n=7, d=3, seed=5)
    X[2] += 4
    D = torch.cdist(X, X)
    best = min(itertools.combinations(range(7), 5),
               key=lambda s: max(D[i, j].item() for i in s for j in s))
    torch.testing.assert_close(MDA(f=2)(X), X[list(best)].mean(0))


def test_centered_clipping_keeps_its_centre_between_calls():
    X = _random(n=5, d=3)
    cc = CenteredClipping(tau=0.5, L=2)
    first = cc(X)
    second = cc(X)
    v = first.clone()  # one more L=2 pass from the first output
    for _ in range(2):
        diff = X - v
        v = v + (diff * torch.clamp(0.5 / diff.norm(dim=1), max=1.0)[:, None]).mean(0)
    torch.testing.assert_close(second, v)
    state = cc.state_dict()
    cc.reset()
    torch.testing.assert_close(cc(X), first)
    cc.load_state_dict(state)
    torch.testing.assert_close(cc(X), CenteredClipping(m=second, tau=0.5, L=2)(X))


def test_weights():
    X = _random(n=4, d=3)
    w = torch.tensor([1.0, 0.0, 3.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(Mean()(X, weights=w), (X[0] + 3 * X[2]) / 4)
    torch.testing.assert_close(GeometricMedian(T=50, nu=1e-12)(X, weights=w),
                               GeometricMedian(T=50, nu=1e-12)(X[[0, 2, 2, 2]]))
    torch.testing.assert_close(CenteredClipping(tau=1e9)(X, weights=w), (X[0] + 3 * X[2]) / 4)
    torch.testing.assert_close((Clipping(c=1.0) >> Mean())(X, weights=w),
                               Mean()(Clipping(c=1.0)(X), weights=w))
    with pytest.raises(ValueError, match="Krum does not take weights"):
        Krum(f=1)(X, weights=w)
    with pytest.raises(ValueError, match="does not take weights"):
        (Bucketing(s=2) >> Mean())(X, weights=w)
    with pytest.raises(ValueError, match="one entry per worker"):
        Mean()(X, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="non-negative"):
        Mean()(X, weights=[1.0, -2.0, 1.0, 1.0])


# --------------------------------------------------------------------------- composition
def test_composition_reads_left_to_right():
    X = _random(n=7)
    rule = NNM(f=2) >> Krum(f=2)
    assert isinstance(rule, Aggregator) and isinstance(rule, Pipeline)
    torch.testing.assert_close(rule(X), Krum(f=2)(NNM(f=2)(X)))
    chain = Clipping(c=1.0) >> NNM(f=1)
    assert isinstance(chain, PreAggregator)
    torch.testing.assert_close((chain >> Mean())(X), NNM(f=1)(Clipping(c=1.0)(X)).mean(0))
    torch.testing.assert_close((Clipping(c=1.0) >> (NNM(f=1) >> Mean()))(X),
                               (chain >> Mean())(X))
    assert repr(rule) == "NNM(f=2) >> Krum(f=2)"
    # bounds are checked on what each stage receives: 4 buckets cannot tolerate f = 2
    with pytest.raises(ValueError, match=r"Krum requires n > 2f.*n=4, f=2"):
        (Bucketing(s=2) >> Krum(f=2))(X)


def test_bucketing_matches_a_manual_shuffle():
    X = _random(n=7)
    out = Bucketing(s=3, generator=torch.Generator().manual_seed(4))(X)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(4))
    P = X[perm]
    torch.testing.assert_close(out, torch.stack([P[:3].mean(0), P[3:6].mean(0), P[6]]))


def test_drop_non_finite():
    X = _random(n=6)
    X[1, 2] = math.inf
    X[4, 0] = -math.inf
    keep = [0, 2, 3, 5]
    torch.testing.assert_close((DropNonFinite() >> GeometricMedian())(X),
                               GeometricMedian()(X[keep]))
    with pytest.raises(ValueError, match="every worker"):
        DropNonFinite()(torch.full((2, 3), math.nan))


# ---------------------------------------------------------------------- numerical safety
def test_pairwise_distances_survive_cancellation():
    g = torch.Generator().manual_seed(0)
    # honest rows close together, far from the origin, plus one huge outlier
    honest = 1e3 + 1e-2 * torch.randn(6, 4000, generator=g, dtype=torch.float64)
    X64 = torch.cat([honest, 1e5 * torch.ones(1, 4000, dtype=torch.float64)])
    exact = torch.cdist(X64, X64, compute_mode="donot_use_mm_for_euclid_dist").square()
    D = pairwise_sq_distances(X64.float()).double()
    exact32 = torch.cdist(X64.float(), X64.float(),
                          compute_mode="donot_use_mm_for_euclid_dist").square().double()
    off = ~torch.eye(7, dtype=torch.bool)
    rel = ((D - exact).abs() / exact)[off]
    assert rel.max() < 1e-3  # every pair, honest-honest ones included
    assert torch.equal(D.diagonal(), torch.zeros(7, dtype=torch.float64))
    # the naive expansion without the safeguards loses the honest distances entirely
    X = X64.float()
    sq = X.square().sum(1)
    naive = (sq[:, None] + sq[None, :] - 2 * X @ X.T).double()
    assert ((naive - exact).abs() / exact)[off].max() > 0.5
    assert ((exact32 - exact).abs() / exact)[off].max() < 1e-3


def test_distance_based_rules_survive_cancellation():
    # float32 rows sharing a common component 1e4 times their spread: the expanded
    # ‖x‖² − 2⟨x, z⟩ + ‖z‖² would cancel to noise; the rules fall back to differences
    g = torch.Generator().manual_seed(1)
    X64 = 100.0 + 1e-2 * torch.randn(7, 3000, generator=g, dtype=torch.float64)
    X = X64.float()

    def gm_ref(X, T, nu):
        z = torch.zeros_like(X[0])
        for _ in range(T):
            a = 1 / (X - z).norm(dim=1).clamp_min(nu)
            z = (a @ X) / a.sum()
        return z

    torch.testing.assert_close(GeometricMedian(T=6, nu=1e-6)(X).double(),
                               gm_ref(X64, 6, 1e-6), rtol=1e-6, atol=1e-6)
    m = X64.mean(0)
    cc = CenteredClipping(m=m.float(), tau=0.3, L=2)(X).double()
    v = m
    for _ in range(2):
        diff = X64 - v
        v = v + (diff * torch.clamp(0.3 / diff.norm(dim=1), max=1.0)[:, None]).mean(0)
    torch.testing.assert_close(cc, v, rtol=1e-6, atol=1e-6)
    dist = (X64 - X64[3]).norm(dim=1)
    torch.testing.assert_close(MoNNA(f=2, idx=3)(X).double(),
                               X64[torch.sort(dist, stable=True).indices[:5]].mean(0),
                               rtol=1e-6, atol=1e-5)  # a wrong neighbour moves it by ~1e-3


# ----------------------------------------------------------------------------- bad input
def test_bounds_name_the_rule():
    X = torch.zeros(4, 3)
    for rule in (TrimmedMean(f=2), Krum(f=2), MultiKrum(f=2), MDA(f=2), MoNNA(f=2)):
        with pytest.raises(ValueError, match=rf"{rule.name} requires n > 2f .*n=4, f=2.*at most 1"):
            rule(X)
    with pytest.raises(ValueError, match="NNM requires n > f"):
        NNM(f=4)(X)
    with pytest.raises(ValueError, match="ARC requires f <= n"):
        ARC(f=5)(X)
    with pytest.raises(ValueError, match="MoNNA: idx=7"):
        MoNNA(f=1, idx=7)(X)
    with pytest.raises(ValueError, match="m=5"):
        MultiKrum(f=1, m=5)(X)
    with pytest.raises(ValueError, match=r"MDA: n=30, f=10 .* max_subsets"):
        MDA(f=10)(torch.zeros(30, 2))


def test_invalid_hyperparameters():
    for make, msg in [(lambda: Krum(f=-1), "Invalid f value: -1"),
                      (lambda: TrimmedMean(f=1.5), "Invalid f value: 1.5"),
                      (lambda: GeometricMedian(nu=0.0), "Invalid nu value"),
                      (lambda: GeometricMedian(T=-1), "Invalid T value"),
                      (lambda: CenteredClipping(tau=-1.0), "Invalid tau value"),
                      (lambda: Clipping(c=-2.0), "Invalid c value"),
                      (lambda: Bucketing(s=0), "Invalid s value"),
                      (lambda: FlagAggregator(r=0), "Invalid r value"),
                      (lambda: FlagAggregator(rescale="x"), "Invalid rescale value"),
                      (lambda: Krum(f=1, neighbors=0), "Invalid neighbors value")]:
        with pytest.raises(ValueError, match=msg):
            make()


def test_non_finite_rows_name_the_worker():
    X = torch.randn(5, 3)
    X[3, 1] = math.nan
    with pytest.raises(ValueError, match=r"Krum: worker\(s\) \[3\] sent non-finite.*DropNonFinite"):
        Krum(f=1)(X)
    X[0, 0] = math.inf
    with pytest.raises(ValueError, match=r"worker\(s\) \[0, 3\]"):
        (NNM(f=1) >> Mean())(X)
    # a row sum that overflows is not a non-finite row
    big = torch.full((3, 4), 1e38)  # float32: each row sums to inf
    assert Mean()(big).eq(1e38).all()


ALL_RULES = [Mean(), CoordinateMedian(), TrimmedMean(f=1), GeometricMedian(),
             GeometricMedian(T=0), GeometricMedian(init=torch.zeros(3)), Krum(f=1),
             MultiKrum(f=1), CenteredClipping(), CenteredClipping(L=0), MDA(f=1), MDA(f=0),
             MoNNA(f=1, idx=2), FlagAggregator(), NNM(f=1), NNM(f=0), Bucketing(s=2),
             Clipping(), ARC(f=1), ARC(f=0), NNM(f=1) >> Krum(f=1), Clipping() >> Mean()]


@pytest.mark.parametrize("rule", ALL_RULES, ids=repr)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_rule_refuses_non_finite_rows(rule, value):
    X = torch.randn(6, 3, dtype=torch.float64)
    X[4, 1] = value
    with pytest.raises(ValueError, match=r"worker\(s\) \[4\] sent non-finite"):
        rule(X)


def test_a_single_row_with_inf_is_refused():
    for rule in (Krum(f=0), MultiKrum(f=0), MoNNA(f=0), NNM(f=0), MDA(f=0)):
        with pytest.raises(ValueError, match=r"worker\(s\) \[0\]"):
            rule(torch.tensor([[1.0, math.inf]]))


def test_shapes_and_dtypes():
    with pytest.raises(ValueError, match=r"expects an \(n, d\) tensor.*shape \(5,\).*torch.stack"):
        Mean()(torch.zeros(5))
    with pytest.raises(ValueError, match="shape"):
        Krum()(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="different shapes"):
        Mean()([torch.zeros(3), torch.zeros(4)])
    with pytest.raises(ValueError, match=r"floating-point.*int64.*X.float"):
        Mean()(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        Mean()(torch.zeros(0, 3))
    with pytest.raises(TypeError, match="last stage"):
        Pipeline([NNM()], NNM())


# ------------------------------------------------------------------ ByzFL as an oracle
def _same_rules(bz_agg, bz_pre):
    """(ours, ByzFL's) pairs whose definitions coincide."""
    return [
        (Mean(), bz_agg.Average()),
        (CoordinateMedian(), bz_agg.Median()),
        (TrimmedMean(f=3), bz_agg.TrMean(f=3)),
        (GeometricMedian(nu=0.1, T=3), bz_agg.GeometricMedian(nu=0.1, T=3)),
        (Krum(f=3), bz_agg.Krum(f=3)),
        (MultiKrum(f=3), bz_agg.MultiKrum(f=3)),
        (CenteredClipping(L=3, tau=2.0), bz_agg.CenteredClipping(L=3, tau=2.0)),
        (MDA(f=2), bz_agg.MDA(f=2)),
        (MoNNA(f=3, idx=2), bz_agg.MoNNA(f=3, idx=2)),
    ]


@pytest.mark.parametrize("n", [8, 9])
def test_equal_to_byzfl_on_random_inputs(n):
    bz_agg, bz_pre, _ = load_byzfl()
    g = torch.Generator().manual_seed(n)
    X = torch.randn(n, 40, generator=g) + torch.randn(40, generator=g)
    X[-2:] *= 10  # two outlying rows
    for ours, theirs in _same_rules(bz_agg, bz_pre):
        for _ in range(2):  # a second call exercises CenteredClipping's state
            torch.testing.assert_close(ours(X), theirs(X.clone()), msg=repr(ours))
    for ours, theirs in [(NNM(f=3), bz_pre.NNM(f=3)), (Clipping(c=2.0), bz_pre.Clipping(c=2.0)),
                         (ARC(f=3), bz_pre.ARC(f=3))]:
        torch.testing.assert_close(ours(X), theirs(X.clone()), msg=repr(ours))
    # Bucketing with torch's global generator, as ByzFL
    torch.manual_seed(7)
    a = Bucketing(s=3)(X)
    torch.manual_seed(7)
    torch.testing.assert_close(a, bz_pre.Bucketing(s=3)(X.clone()))
    # numpy input gives the same answer as ByzFL's numpy path
    Xn = X.double().numpy()
    np.testing.assert_allclose(Krum(f=3)(Xn).numpy(), bz_agg.Krum(f=3)(Xn), rtol=1e-12)


def test_arc_count_differs_from_byzfl_only_by_its_float_rounding():
    _, bz_pre, _ = load_byzfl()
    X = torch.arange(1.0, 122.0)[:, None] * torch.ones(1, 2)
    ours, theirs = ARC(f=66)(X), bz_pre.ARC(f=66)(X.clone())
    # k = 2·66·55/121 = 60 exactly; ByzFL's int((132/121)·55) = int(59.999…) = 59
    assert torch.equal(ours[:61], X[:61]) and torch.allclose(ours[61:], X[60].expand(60, 2))
    assert torch.equal(theirs[:62], X[:62]) and torch.allclose(theirs[62:], X[61].expand(59, 2))
    torch.testing.assert_close(ARC(f=65)(X), bz_pre.ARC(f=65)(X.clone()))
