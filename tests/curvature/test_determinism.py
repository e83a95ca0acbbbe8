"""Known-answer test 12 (docs/curvature.md): the determinism guard, and that curvature never
consumes the global RNG."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from gradkit.curvature import (
    GGNOperator,
    HessianOperator,
    NondeterministicError,
    hutchinson_trace,
    lanczos,
    spectral_density,
)
from tests.curvature._helpers import tiny_mlp as model

F64 = torch.float64
CE = nn.functional.cross_entropy


def data(N=40):
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 4, generator=g, dtype=F64), torch.randint(0, 3, (N,), generator=g)


class Augmented(Dataset):
    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i] + 0.1 * torch.randn(self.X.shape[1], dtype=F64), self.y[i]


def test_shuffled_loader_is_refused_naming_data_order():
    loader = DataLoader(TensorDataset(*data()), batch_size=16, shuffle=True)
    with pytest.raises(NondeterministicError, match=r"\(data order\).*shuffle=False"):
        HessianOperator(model(), CE, loader)


def test_shuffled_loader_with_its_own_generator_is_refused():
    loader = DataLoader(TensorDataset(*data()), batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    with pytest.raises(NondeterministicError, match="data order"):
        GGNOperator(model(), CE, loader)


def test_augmentation_is_refused_naming_data_values():
    loader = DataLoader(Augmented(*data()), batch_size=16, shuffle=False)
    with pytest.raises(NondeterministicError, match=r"\(data values\).*augmentation"):
        HessianOperator(model(), CE, loader)


def test_dropout_in_train_mode_is_refused_naming_model_output():
    net = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, 3)).double()
    with pytest.raises(NondeterministicError, match=r"\(model output\).*model\.eval\(\)"):
        HessianOperator(net, CE, data())
    net.eval()
    HessianOperator(net, CE, data())  # deterministic in eval mode


def test_deterministic_loader_passes_and_check_can_be_disabled():
    X, y = data()
    HessianOperator(model(), CE, DataLoader(TensorDataset(X, y), batch_size=16))
    HessianOperator(model(), CE, [(X[:20], y[:20]), (X[20:], y[20:])])
    loader = DataLoader(TensorDataset(X, y), batch_size=16, shuffle=True)
    op = HessianOperator(model(), CE, loader, check_deterministic=False)
    assert op.num_examples == 40


def test_global_rng_is_not_consumed():
    X, y = data()
    loader = DataLoader(TensorDataset(X, y), batch_size=16)  # draws a base seed per epoch
    net = model()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    op = HessianOperator(net, CE, loader)
    g = torch.Generator().manual_seed(0)
    lanczos(op, 2, generator=g)
    hutchinson_trace(op, 4, generator=g)
    spectral_density(op, 2, 5, generator=g)
    op.gradient()
    assert torch.equal(torch.get_rng_state(), state)
