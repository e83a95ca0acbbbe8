import subprocess
import sys

import pytest
import torch

import gradkit
from gradkit import optim
from gradkit.errors import UsageError


def test_lazy_subpackages_import():
    assert gradkit.optim is optim
    with pytest.raises(AttributeError):
        gradkit.does_not_exist  # noqa: B018


def test_registry_has_torch_baselines_and_creates_them():
    names = optim.available()
    for name in ("adam", "adamw", "sgd"):
        assert name in names
    model = torch.nn.Linear(3, 1)
    opt = optim.create("AdamW", model.parameters(), lr=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["lr"] == 0.1


def test_registry_unknown_name_lists_valid_names():
    with pytest.raises(UsageError, match=r"unknown optimizer 'nope'.*adam"):
        optim.create("nope", [torch.zeros(1, requires_grad=True)])


def test_cli_bad_usage_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "gradkit.cli", "no-such-command"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
