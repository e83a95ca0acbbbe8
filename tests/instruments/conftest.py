"""The instrument tests use tiny models: each runs with one intra-op thread."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here uses the shared ``one_thread`` fixture (tests/conftest.py)."""
