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


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (tiny models run several times faster, and immune to
    oversubscription when the machine is busy, even in a serial run)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
