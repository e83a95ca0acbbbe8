"""The instrument tests use tiny models: one intra-op thread is faster (and immune to
oversubscription when the machine is busy) even in a serial run."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
