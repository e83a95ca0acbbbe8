"""User-defined optimizer and workloads for the module:attr tests (imported by name)."""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from gradkit.bench.workloads import Arrays, ArrayWorkload


class SignSGD(torch.optim.Optimizer):
    """p ← p − lr·sign(g): a minimal user optimizer with a default lr."""

    def __init__(self, params, lr: float = 0.01):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])
        return loss


class Exploding(torch.optim.Optimizer):
    """Raises inside step: its trials must be marked failed and the run must go on."""

    def __init__(self, params, lr: float = 0.1):
        super().__init__(params, {"lr": lr})

    def step(self, closure=None):
        raise RuntimeError("boom from Exploding.step")


class NotAnOptimizer:
    pass


class LinearRegression(ArrayWorkload):
    """y = X w* + noise, 8 features; metric: validation MSE (lower is better)."""

    name = "linreg"
    metric = "mse"
    higher_is_better = False
    target = 0.05
    steps = 20
    batch_size = 16
    eval_every = 5
    description = "user workload: linear regression"
    sleep = 0.0

    def arrays(self) -> Arrays:
        g = torch.Generator().manual_seed(123)
        x = torch.randn(240, 8, generator=g)
        y = x @ torch.linspace(-1, 1, 8) + 0.1 * torch.randn(240, generator=g)
        return Arrays(x[:160], y[:160], x[160:200], y[160:200], x[200:], y[200:])

    def build_model(self) -> nn.Module:
        return nn.Linear(8, 1)

    def loss_and_metric(self, output, target):
        if self.sleep:
            time.sleep(self.sleep)
        mse = (output.squeeze(-1) - target).square().mean()
        return mse, mse


def make_workload() -> LinearRegression:
    return LinearRegression()


def make_slow_workload() -> LinearRegression:
    """Each loss evaluation sleeps (seconds from GRADKIT_TEST_SLEEP) so a run can be killed."""
    workload = LinearRegression()
    workload.name = "linreg-slow"
    workload.sleep = float(os.environ.get("GRADKIT_TEST_SLEEP", "0.01"))
    return workload


def broken_factory():
    raise RuntimeError("factory exploded")


not_a_workload = object()


class Hanging(torch.optim.Optimizer):
    """Never returns from step (a user optimizer stuck in a loop)."""

    def __init__(self, params, lr: float = 0.1):
        super().__init__(params, {"lr": lr})

    def step(self, closure=None):
        while True:
            time.sleep(0.05)


class KillsItsProcess(torch.optim.Optimizer):
    """Ends its process at the first step, as a segfault or an out-of-memory kill would."""

    def __init__(self, params, lr: float = 0.1):
        super().__init__(params, {"lr": lr})

    def step(self, closure=None):
        os._exit(3)


class Segfaults(torch.optim.Optimizer):
    """Dereferences a null pointer at the first step (SIGSEGV)."""

    def __init__(self, params, lr: float = 0.1):
        super().__init__(params, {"lr": lr})

    def step(self, closure=None):
        import ctypes

        ctypes.string_at(0)
