import pytest
import torch
from torch import nn

from gradkit.autodiff import FlatParams, per_example_grads


def _model():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _loop_reference(model, x, y):
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return {n: torch.stack([r[n] for r in rows]) for n in rows[0]}


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_vmap_matches_python_loop_and_averages_to_batch_grad(chunk_size):
    model = _model()
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    got = per_example_grads(model, nn.functional.cross_entropy, x, y, chunk_size=chunk_size)
    want = _loop_reference(model, x, y)
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n])
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n].mean(0), p.grad)


def test_loop_method_equals_vmap_and_subset_of_params():
    model = _model()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    names = ["2.weight"]
    a = per_example_grads(model, nn.functional.cross_entropy, x, y, params=names, method="loop")
    b = per_example_grads(model, nn.functional.cross_entropy, x, y, params=names, method="vmap")
    assert list(a) == names
    torch.testing.assert_close(a["2.weight"], b["2.weight"])


def test_train_mode_batchnorm_is_refused_with_advice():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    with pytest.raises(RuntimeError, match=r"BatchNorm in train mode.*eval"):
        per_example_grads(model, nn.functional.cross_entropy, x, y)
    model.eval()
    grads = per_example_grads(model, nn.functional.cross_entropy, x, y)
    assert grads["0.weight"].shape == (6, 4, 4)


def test_unvmappable_module_falls_back_to_loop_with_warning():
    class Opaque(torch.autograd.Function):  # no vmap rule
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return Opaque.apply(self.lin(x))

    model = Net().double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    with pytest.warns(RuntimeWarning, match="falling back"):
        got = per_example_grads(model, nn.functional.cross_entropy, x, y)
    want = _loop_reference(model, x, y)
    torch.testing.assert_close(got["lin.weight"], want["lin.weight"])


def test_flat_params_round_trip_and_batched_unflatten():
    model = _model()
    flat = FlatParams.from_module(model)
    assert flat.numel == sum(p.numel() for p in model.parameters())
    vec = flat.flatten([p for p in model.parameters()])
    for view, p in zip(flat.unflatten(vec), model.parameters()):
        assert torch.equal(view, p)
    batch = torch.randn(3, flat.numel, dtype=torch.float64)
    views = flat.unflatten(batch)
    assert views[0].shape == (3, 5, 4)
    with pytest.raises(ValueError, match="expected a vector of length"):
        flat.unflatten(torch.zeros(flat.numel + 1))
    with pytest.raises(ValueError, match="unknown parameter"):
        FlatParams.from_module(model, ["nope"])
