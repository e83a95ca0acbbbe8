import math

import pytest
import torch
from byzfl_oracle import load as load_byzfl

from gradkit.distributed.aggregators import DropNonFinite, GeometricMedian, Krum
from gradkit.distributed.attacks import (
    ALittleIsEnough,
    Gaussian,
    Inf,
    InnerProductManipulation,
    LabelFlipping,
    Mimic,
    SignFlipping,
    alie_z_max,
)

X3 = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]

KAT = [
    (SignFlipping(), [-4, -5, -6]),
    (InnerProductManipulation(tau=2.0), [-8, -10, -12]),
    (ALittleIsEnough(tau=1.5), [8.5, 9.5, 10.5]),
    (Mimic(epsilon=0), [1, 2, 3]),
    (Inf(), [math.inf] * 3),
    (LabelFlipping(), [4, 5, 6]),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("attack", "expected"), KAT, ids=[repr(a) for a, _ in KAT])
def test_byzfl_3x3_known_answers(attack, expected, dtype):
    H = torch.tensor(X3, dtype=dtype)
    for inputs in (H, list(H), H.numpy()):
        out = attack(inputs)
        assert out.dtype == dtype and out.shape == (3,)
        torch.testing.assert_close(out, torch.tensor(expected, dtype=dtype))


def test_gaussian_shape_determinism_and_moments():
    H = torch.zeros(4, 20000, dtype=torch.float64)
    a = Gaussian(mu=1.0, sigma=2.0)(H, generator=torch.Generator().manual_seed(3))
    b = Gaussian(mu=1.0, sigma=2.0)(H, generator=torch.Generator().manual_seed(3))
    assert a.shape == (20000,) and a.dtype == torch.float64 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert abs(a.mean().item() - 1.0) < 0.05 and abs(a.std().item() - 2.0) < 0.05


def test_alie_factor_from_n_and_f():
    # Baruch et al.: s = ⌊n/2 + 1⌋ − f, z = Φ⁻¹((n − s)/n)
    assert alie_z_max(50, 12) == pytest.approx(0.5828, abs=1e-4)
    assert alie_z_max(20, 4) == pytest.approx(0.3853, abs=1e-4)
    H = torch.randn(16, 5, dtype=torch.float64)
    out = ALittleIsEnough(tau="alie")(H, f=4)
    torch.testing.assert_close(out, H.mean(0) + alie_z_max(20, 4) * H.std(0))
    with pytest.raises(ValueError, match="needs the number of Byzantine workers"):
        ALittleIsEnough(tau="alie")(H)


def test_corrupt_replaces_the_chosen_rows():
    X = torch.randn(6, 4, dtype=torch.float64)
    out = SignFlipping().corrupt(X, byzantine=[1, 4])
    honest = X[[0, 2, 3, 5]]
    torch.testing.assert_close(out[[1, 4]], -honest.mean(0).expand(2, 4))
    torch.testing.assert_close(out[[0, 2, 3, 5]], honest)
    assert not torch.equal(out, X)  # X itself untouched, a new tensor returned
    with pytest.raises(ValueError, match="every row is Byzantine"):
        SignFlipping().corrupt(X, byzantine=range(6))
    with pytest.raises(ValueError, match="Invalid byzantine value: 9"):
        SignFlipping().corrupt(X, byzantine=[9])


def test_inf_attack_is_refused_unless_dropped():
    X = Inf().corrupt(torch.randn(5, 3), byzantine=[2])
    with pytest.raises(ValueError, match=r"worker\(s\) \[2\]"):
        Krum(f=1)(X)
    torch.testing.assert_close((DropNonFinite() >> GeometricMedian())(X),
                               GeometricMedian()(X[[0, 1, 3, 4]]))


def test_bad_arguments():
    for make, msg in [(lambda: InnerProductManipulation(tau="x"), "Invalid tau value"),
                      (lambda: ALittleIsEnough(tau=math.nan), "Invalid tau value"),
                      (lambda: Mimic(epsilon=-1), "Invalid epsilon value"),
                      (lambda: Gaussian(sigma=-1.0), "Invalid sigma value"),
                      (lambda: LabelFlipping(num_classes=1), "Invalid num_classes value")]:
        with pytest.raises(ValueError, match=msg):
            make()
    with pytest.raises(ValueError, match="epsilon=5 must be smaller"):
        Mimic(epsilon=5)(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="at least 2 honest"):
        ALittleIsEnough()(torch.zeros(1, 2))


def test_equal_to_byzfl_on_random_inputs():
    _, _, bz = load_byzfl()
    H = torch.randn(7, 30)
    for ours, theirs in [(SignFlipping(), bz.SignFlipping()),
                         (InnerProductManipulation(tau=3.0), bz.InnerProductManipulation(tau=3.0)),
                         (ALittleIsEnough(tau=0.7), bz.ALittleIsEnough(tau=0.7)),
                         (Mimic(epsilon=4), bz.Mimic(epsilon=4)),
                         (LabelFlipping(), bz.LabelFlipping())]:
        torch.testing.assert_close(ours(H), theirs(H.clone()), msg=repr(ours))
    assert torch.equal(Inf()(H), bz.Inf()(H).float())  # ByzFL returns float64
