"""Known-answer test 20 (docs/curvature.md): agreement with an independent library
(PyHessian, installed as a dev anchor)."""

import importlib

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradkit.curvature import HessianOperator
from tests.curvature._helpers import tiny_mlp

pyhessian = pytest.importorskip("pyhessian")
F64 = torch.float64
CE = nn.functional.cross_entropy


def as_list(model, v):
    return [t.reshape(p.shape) for t, p in zip(torch.split(v, [p.numel() for p in
                                                              model.parameters()]),
                                               model.parameters())]


def test_full_dataset_hvp_matches_pyhessian_dataloader_mode():
    model = tiny_mlp()
    X, y = torch.randn(69, 4, dtype=F64), torch.randint(0, 3, (69,))
    loader = DataLoader(TensorDataset(X, y), batch_size=32, shuffle=False)
    ph = pyhessian.hessian(model, CE, dataloader=loader, cuda=False)
    op = HessianOperator(model, CE, loader)
    for _ in range(3):
        v = torch.randn(op.shape[0], dtype=F64)
        _, theirs = ph.dataloader_hv_product(as_list(model, v))
        torch.testing.assert_close(op @ v, torch.cat([t.reshape(-1) for t in theirs]))
    for p in model.parameters():
        p.grad = None


def test_single_batch_hvp_matches_pyhessian():
    model = tiny_mlp()
    X, y = torch.randn(20, 4, dtype=F64), torch.randint(0, 3, (20,))
    ph = pyhessian.hessian(model, CE, data=(X, y), cuda=False)
    ph_utils = importlib.import_module("pyhessian.utils")
    op = HessianOperator(model, CE, (X, y))
    v = torch.randn(op.shape[0], dtype=F64)
    theirs = ph_utils.hessian_vector_product(ph.gradsH, ph.params, as_list(model, v))
    torch.testing.assert_close(op @ v, torch.cat([t.reshape(-1) for t in theirs]))
    for p in model.parameters():
        p.grad = None
