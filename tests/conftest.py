"""Shared test configuration: deterministic, single-threaded torch per test worker."""

import os

import pytest
import torch

# Two xdist workers share 2 cores; one intra-op thread each avoids oversubscription.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
