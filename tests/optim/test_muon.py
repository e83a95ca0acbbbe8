"""Muon: NS5 known answers, the one-step KAT, shape scales, float64 parity, param split."""

import copy
import math

import pytest
import torch
from torch import nn

from gradkit.optim import Muon, create, muon_param_groups, newton_schulz5
from tests.optim.roundtrip import assert_bitwise_resume, mse_run

A, B, C = 3.4445, -4.7750, 2.0315


def ref_ns5(G, steps=5):
    """Independent NS5 in float64 from the spec's pseudo-code (no batching, explicit form)."""
    X = G.double()
    transposed = X.shape[0] > X.shape[1]
    if transposed:
        X = X.T
    X = X / (torch.sqrt((X * X).sum()) + 1e-7)
    for _ in range(steps):
        XXt = X @ X.T
        X = A * X + B * (XXt @ X) + C * (XXt @ XXt @ X)
    return X.T if transposed else X


def rand_orthogonal(n, gen):
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    return q * torch.sign(torch.diagonal(r))


# ----------------------------------------------------------------------- NS5 KATs
def test_scalar_map_known_values():
    one = torch.ones(1, 1, dtype=torch.float64)
    got = [newton_schulz5(one, k, dtype=torch.float64).item() for k in range(1, 6)]
    assert got == pytest.approx([0.7010, 1.1136, 0.7207, 1.0900, 0.6964], abs=5e-5)
    for sigma, expected in [(0.5, 0.7654), (1e-3, 0.4705)]:
        # diag(σ, sqrt(1 − σ²)) has Frobenius norm 1, so σ is the normalised singular value
        G = torch.diag(torch.tensor([sigma, math.sqrt(1 - sigma**2)], dtype=torch.float64))
        out = newton_schulz5(G, dtype="float64")
        assert out[0, 0].item() == pytest.approx(expected, abs=5e-5)
        assert out[0, 1].item() == 0.0 and out[1, 0].item() == 0.0


def test_bfloat16_path_follows_bf16_arithmetic():
    """bf16 (default, as the reference) rounds every intermediate to bfloat16.

    On diagonal inputs NS5 acts coordinate-wise, so an independent scalar bf16 recurrence of
    the spec's pseudo-code must give the same bits. (The spec's 2e-2 bf16-vs-fp64 tolerance
    does not hold for the scalar map: bf16 rounding alone gives 0.6719 vs 0.6964 at σ = 1
    and 0.875 vs 0.7654 at σ = 0.5 after five steps.)
    """
    for diag in ([1.0], [0.5, math.sqrt(0.75)], [0.3, 0.2, 0.9]):
        G = torch.diag(torch.tensor(diag))
        for steps in range(1, 6):
            out = newton_schulz5(G, steps)
            assert out.dtype == torch.bfloat16
            assert torch.equal(torch.diagonal(out), bf16_scalar_ns(diag, steps))


def test_bfloat16_close_to_float64_on_random_matrices():
    gen = torch.Generator().manual_seed(1)
    for shape in [(16, 32), (48, 24), (64, 64)]:
        G = torch.randn(*shape, generator=gen)
        exact = newton_schulz5(G, dtype=torch.float64)
        rel = torch.linalg.norm(newton_schulz5(G).double() - exact) / torch.linalg.norm(exact)
        assert rel < 5e-2  # measured ≈ 3e-2: bf16 has an 8-bit mantissa


def test_orthogonal_equivariance_and_reference():
    gen = torch.Generator().manual_seed(2)
    G = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    Q1, Q2 = rand_orthogonal(6, gen), rand_orthogonal(4, gen)
    lhs = newton_schulz5(Q1 @ G @ Q2, dtype="float64")
    rhs = Q1 @ newton_schulz5(G, dtype="float64") @ Q2
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-12)
    torch.testing.assert_close(newton_schulz5(G, dtype="float64"), ref_ns5(G), rtol=0,
                               atol=1e-13)


def test_tall_input_is_transposed_and_singular_values_near_one():
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(12, 5, dtype=torch.float64, generator=gen)
    assert torch.equal(newton_schulz5(G, dtype="float64"), newton_schulz5(G.T, dtype="float64").T)
    s = torch.linalg.svdvals(newton_schulz5(G, dtype="float64"))
    assert s.min() > 0.6 and s.max() < 1.25  # U S' Vᵀ with S' in the NS5 band, not exactly 1


def test_batched_equals_per_matrix():
    gen = torch.Generator().manual_seed(4)
    G = torch.randn(3, 5, 7, dtype=torch.float64, generator=gen)
    batched = newton_schulz5(G, dtype="float64")
    for i in range(3):
        torch.testing.assert_close(batched[i], newton_schulz5(G[i], dtype="float64"), rtol=0,
                                   atol=1e-14)


# ----------------------------------------------------------------------- Muon step KATs
def bf16_scalar_ns(values, steps=5):
    """The spec's NS5 pseudo-code on a diagonal, coordinate-wise, every op rounded to bf16."""
    x = torch.tensor(values, dtype=torch.bfloat16)
    x = x / (torch.linalg.vector_norm(x) + 1e-7)
    for _ in range(steps):
        a2 = x * x
        x = A * x + (B * a2 + C * (a2 * a2)) * x
    return x


def test_one_full_step_kat():
    # fp64: O ≈ diag(0.6964, 0) -> p ≈ diag(−0.013928, 0) (spec KAT)
    p = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    p.grad = torch.diag(torch.tensor([2.0, 0.0], dtype=torch.float64))
    Muon([p], lr=0.02, momentum=0.95, nesterov=True, ns_dtype="float64").step()
    expected = torch.diag(torch.tensor([-0.013928, 0.0], dtype=torch.float64))
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)
    # bf16 default: the same step with bf16 arithmetic (0.671875 instead of 0.6964)
    q = nn.Parameter(torch.zeros(2, 2))
    q.grad = torch.diag(torch.tensor([2.0, 0.0]))
    Muon([q], lr=0.02).step()
    o = bf16_scalar_ns([0.0975 * 2.0, 0.0]).float()
    assert torch.equal(q.detach(), torch.diag(-0.02 * o))
    assert abs(q[0, 0].item() + 0.013928) < 0.04 * 0.013928


@pytest.mark.parametrize("shape, scale", [((4, 2), math.sqrt(2)), ((2, 4), 1.0),
                                          ((8, 1, 1, 2), 2.0), ((2, 3, 3, 3), 1.0)])
def test_shape_scale(shape, scale):
    """Matrices: sqrt(max(1, rows/cols)). Conv (choice): the flattened (out, in·kh·kw) shape.

    (8, 1, 1, 2) flattens to 8×2 -> factor 2; the reference's size(-2)/size(-1) rule would
    give max(1, 1/2) -> 1 here, so this case pins the documented choice.
    """
    gen = torch.Generator().manual_seed(5)
    G = torch.randn(*shape, dtype=torch.float64, generator=gen)
    p = nn.Parameter(torch.zeros(*shape, dtype=torch.float64))
    p.grad = G.clone()
    Muon([p], lr=1.0, momentum=0.0, ns_dtype="float64").step()  # β = 0: U = G
    direction = ref_ns5(G.reshape(shape[0], -1)).reshape(shape)
    torch.testing.assert_close(p.detach(), -scale * direction, rtol=0, atol=1e-12)


def test_decoupled_weight_decay_with_zero_gradient():
    p = nn.Parameter(torch.full((3, 3), 2.0, dtype=torch.float64))
    p.grad = torch.zeros(3, 3, dtype=torch.float64)
    Muon([p], lr=0.1, weight_decay=0.5, ns_dtype="float64").step()
    torch.testing.assert_close(p.detach(), torch.full((3, 3), 2.0 * (1 - 0.05),
                                                      dtype=torch.float64))


# ----------------------------------------------------------------------- float64 parity
class RefMuon:
    """Muon + aux AdamW written from the spec's equations (float64)."""

    def __init__(self, params, groups, beta, nesterov, lr, wd, alr, abetas, aeps, awd, sign):
        self.p = [t.detach().clone() for t in params]
        self.groups, self.sign = groups, sign
        self.beta, self.nesterov, self.lr, self.wd = beta, nesterov, lr, wd
        self.alr, (self.b1, self.b2), self.aeps, self.awd = alr, abetas, aeps, awd
        self.m = [torch.zeros_like(t) for t in self.p]
        self.v = [torch.zeros_like(t) for t in self.p]
        self.t = 0

    def step(self, grads):
        self.t += 1
        for i, (x, g) in enumerate(zip(self.p, grads)):
            g = self.sign * g
            if self.groups[i]:  # Muon
                self.m[i] = self.beta * self.m[i] + (1 - self.beta) * g
                u = (1 - self.beta) * g + self.beta * self.m[i] if self.nesterov else self.m[i]
                mat = u.reshape(u.shape[0], -1)
                o = ref_ns5(mat) * max(1.0, mat.shape[0] / mat.shape[1]) ** 0.5
                self.p[i] = x * (1 - self.lr * self.wd) - self.lr * o.reshape(x.shape)
            else:  # AdamW with bias correction
                self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
                self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
                mhat = self.m[i] / (1 - self.b1**self.t)
                vhat = self.v[i] / (1 - self.b2**self.t)
                self.p[i] = x * (1 - self.alr * self.awd) - self.alr * mhat / (
                    vhat.sqrt() + self.aeps)


@pytest.mark.parametrize("foreach, nesterov, maximize", [(False, True, False),
                                                         (True, True, True),
                                                         (False, False, False)])
def test_float64_parity_with_reference(foreach, nesterov, maximize):
    gen = torch.Generator().manual_seed(6)
    shapes = [(5, 3), (5, 3), (5, 3), (3, 7), (4, 2, 3, 3), (7,), (2, 3)]
    is_muon = [True, True, True, True, True, False, False]
    params = [nn.Parameter(torch.randn(*s, dtype=torch.float64, generator=gen)) for s in shapes]
    groups = [
        {"params": [p for p, m in zip(params, is_muon) if m]},
        {"params": [p for p, m in zip(params, is_muon) if not m], "use_muon": False,
         "weight_decay": 0.1},
    ]
    opt = Muon(groups, lr=0.03, momentum=0.9, nesterov=nesterov, weight_decay=0.2,
               adamw_lr=1e-2, adamw_betas=(0.8, 0.9), adamw_eps=1e-8, ns_dtype="float64",
               maximize=maximize, foreach=foreach)
    ref = RefMuon(params, is_muon, 0.9, nesterov, 0.03, 0.2, 1e-2, (0.8, 0.9), 1e-8, 0.1,
                  -1.0 if maximize else 1.0)
    for _ in range(25):
        grads = [torch.randn(*s, dtype=torch.float64, generator=gen) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g)  # p.grad never modified
    for p, r in zip(params, ref.p):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-10)


def test_anchor_pytorch_optimizer_muon():
    """Same variant as pytorch_optimizer.Muon (called as an oracle) on a 2-D weight.

    Theirs iterates NS5 in bfloat16, ours here in float64: agreement to bf16 accuracy
    (measured max |diff| ≈ 8e-4 after 5 steps that move the weights by ≈ 0.1).
    """
    po = pytest.importorskip("pytorch_optimizer")
    gen = torch.Generator().manual_seed(7)
    w0 = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    ours = Muon([a], lr=0.02, weight_decay=0.01, ns_dtype="float64")
    theirs = po.Muon([{"params": [b], "use_muon": True}], lr=0.02, weight_decay=0.01)
    for _ in range(5):
        g = torch.randn(6, 4, generator=gen, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert (a - w0).abs().max() > 0.05
    torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=2e-3)


# ----------------------------------------------------------------------- conventions
def test_validation_errors_name_the_argument():
    p = nn.Parameter(torch.zeros(2, 2))
    for kwargs, text in [({"lr": -1.0}, "learning rate"), ({"momentum": 1.0}, "momentum"),
                         ({"ns_steps": 0}, "ns_steps"), ({"weight_decay": -1.0}, "weight_decay"),
                         ({"adamw_betas": (0.9, 1.0)}, "beta"), ({"ns_dtype": "int8"}, "ns_dtype"),
                         ({"adamw_eps": -1.0}, "adamw_eps")]:
        with pytest.raises(ValueError, match=text):
            Muon([p], **kwargs)
    with pytest.raises(ValueError, match="muon_param_groups"):
        Muon([nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="learning rate"):
        Muon([{"params": [nn.Parameter(torch.zeros(3))], "use_muon": False, "lr": -1}])
    Muon([p], lr=0.0)  # lr = 0 allowed


def test_grad_none_skipped_sparse_refused():
    a, b = nn.Parameter(torch.ones(3, 3)), nn.Parameter(torch.ones(3, 3))
    a.grad = torch.ones(3, 3)
    opt = Muon([a, b], weight_decay=0.1)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(3, 3)) and b not in opt.state
    assert not torch.equal(a.detach(), torch.ones(3, 3))
    a.grad = torch.eye(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def _net():
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


def test_state_dict_round_trip_and_scheduler():
    torch.manual_seed(0)
    run = mse_run(torch.randn(16, 4), torch.randn(16, 2))
    _, opt, _ = assert_bitwise_resume(
        _net, lambda m: Muon(muon_param_groups(m), weight_decay=0.01, adamw_weight_decay=0.01),
        run, build_fresh_opt=lambda m: Muon(muon_param_groups(m)))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.01, 1.5e-4]


def test_registry_closure_hooks_deepcopy():
    p = nn.Parameter(torch.ones(2, 2))
    opt = create("muon", [p], lr=0.1)
    assert isinstance(opt, Muon) and opt.param_groups[0]["lr"] == 0.1
    fired, grad_mode = [], []
    opt.register_step_pre_hook(lambda *_: fired.append("pre"))
    opt.register_step_post_hook(lambda *_: fired.append("post"))

    def closure():
        grad_mode.append(torch.is_grad_enabled())
        loss = (p * torch.tensor([[1.0, 2.0], [3.0, 4.0]])).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 10.0
    assert fired == ["pre", "post"] and grad_mode == [True]
    assert not torch.equal(p.detach(), torch.ones(2, 2))
    clone = copy.deepcopy(opt)
    assert clone.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    assert "Muon" in repr(opt)


# ----------------------------------------------------------------------- param split
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.stem = nn.Conv2d(3, 4, 3)
        self.body = nn.Conv2d(4, 4, 3)
        self.hidden = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 5)
        self.scale = nn.Parameter(torch.ones(()))


def test_muon_param_groups_split():
    net = Net()
    muon, aux = muon_param_groups(net)
    assert muon["use_muon"] and not aux["use_muon"]
    assert {id(p) for p in muon["params"]} == {id(net.body.weight), id(net.hidden.weight)}
    assert len(aux["params"]) == len(list(net.parameters())) - 2
    named = muon_param_groups(net, head="hidden", first_conv=False, adamw=["body.weight"])
    assert {id(p) for p in named[0]["params"]} == {id(net.stem.weight), id(net.out.weight)}
    with pytest.raises(ValueError, match="adamw"):
        muon_param_groups(net, adamw=["nope"])
    net.hidden.weight.requires_grad_(False)
    assert all(p is not net.hidden.weight for g in muon_param_groups(net) for p in g["params"])
    Muon(muon_param_groups(net)).step()  # a valid split constructs and steps (no grads)


def test_named_parameters_like_torch():
    """named_parameters() (flat and in groups) is accepted; a 1-D tensor in a Muon group is
    still the clear ValueError, not a crash on the (name, tensor) pair."""
    net = nn.Sequential(nn.Linear(4, 8, bias=False), nn.Tanh(), nn.Linear(8, 3, bias=False))
    opt = Muon(net.named_parameters(), lr=0.02)
    assert opt.param_groups[0]["param_names"] == ["0.weight", "2.weight"]
    with pytest.raises(ValueError, match="muon_param_groups"):
        Muon(_net().named_parameters())
    named = dict(_net().named_parameters())
    groups = [{"params": [(n, p) for n, p in named.items() if p.ndim == 2]},
              {"params": [(n, p) for n, p in named.items() if p.ndim < 2], "use_muon": False}]
    Muon(groups).step()


@pytest.mark.parametrize("foreach", [False, True])
def test_aux_adamw_is_torchs_adamw(foreach):
    """use_muon=False groups run torch.optim.AdamW itself: bitwise the same steps."""
    gen = torch.Generator().manual_seed(8)
    w0 = torch.randn(7, generator=gen, dtype=torch.float64)
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    ours = Muon([{"params": [a], "use_muon": False}], adamw_lr=1e-2, adamw_betas=(0.8, 0.9),
                adamw_eps=1e-8, adamw_weight_decay=0.1, foreach=foreach, maximize=True)
    theirs = torch.optim.AdamW([b], lr=1e-2, betas=(0.8, 0.9), eps=1e-8, weight_decay=0.1,
                               foreach=foreach, maximize=True)
    for _ in range(10):
        g = torch.randn(7, generator=gen, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert torch.equal(a, b)
    assert torch.equal(ours.state[a]["step"], theirs.state[b]["step"])
