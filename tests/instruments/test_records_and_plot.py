"""JSONL/SQLite records, TensorBoard extra error, the dashboard PNG and ``gradkit plot``."""

import json
import sqlite3
import subprocess
import sys

import pytest
import torch
from torch import nn

from gradkit.cli import main
from gradkit.errors import MissingExtraError
from gradkit.instruments import (
    GradNorm,
    Instrument,
    LogitStats,
    Loss,
    Monitor,
    OpposingSignals,
    load_run,
    plot,
)
from tests.instruments.helpers import monitored_steps

ce = nn.functional.cross_entropy


class Constant(Instrument):
    name = "const"

    def measure(self, ctx):
        return {"nan_value": float("nan"), "tag": "x", "tensor": torch.tensor([1.5, 2.0])}


def _run(log_dir, steps=6, **kwargs):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    mon = monitored_steps(model, ce, opt, x, y, [
        Loss(), GradNorm(every=2), LogitStats(every=3), OpposingSignals(every=2, k=2),
        Constant(every=5)], steps=steps, log_dir=log_dir, flush_every=4, **kwargs)
    mon.close()
    return mon


def test_jsonl_and_sqlite_hold_the_same_records(tmp_path):
    mon = _run(tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(6))
    assert len(lines) == len(mon.history) == 6
    from_jsonl = load_run(tmp_path)  # a directory resolves to its JSONL
    from_sqlite = load_run(tmp_path / "metrics.sqlite")
    assert from_jsonl == from_sqlite
    steps, values = from_jsonl["loss"]
    assert steps == list(range(6))
    assert values == pytest.approx([r["loss"] for r in mon.history])
    assert from_jsonl["grad_norm"][0] == [0, 2, 4]
    assert from_jsonl["opposing_up_index"][1][0] == mon.history[0]["opposing_up_index"]
    assert from_jsonl["nan_value"] == ([0, 5], [None, None])  # non-finite -> null
    assert from_jsonl["tag"] == ([0, 5], ["x", "x"])
    assert from_jsonl["tensor"] == ([0, 5], [[1.5, 2.0], [1.5, 2.0]])
    with sqlite3.connect(tmp_path / "metrics.sqlite") as db:
        n = db.execute("SELECT COUNT(*) FROM records WHERE name = 'loss'").fetchone()[0]
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    assert n == 6 and "Loss(every=1" in meta["instruments"]


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'gradkit\[tensorboard\]'"):
        Monitor(nn.Linear(2, 2), ce, log_dir=tmp_path / "tb", tensorboard=True)
    assert not (tmp_path / "tb").exists()
    with pytest.raises(ValueError, match="log_dir"):
        Monitor(nn.Linear(2, 2), ce, tensorboard=True)


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_writes_a_png_from_jsonl_or_sqlite(tmp_path):
    _run(tmp_path / "run")
    out = plot(tmp_path / "run", tmp_path / "a.png")
    assert out == tmp_path / "a.png" and _is_png(out)
    assert _is_png(plot(tmp_path / "run" / "metrics.sqlite", tmp_path / "b" / "b.png"))


def test_cli_plot_writes_png_next_to_the_run(tmp_path, capsys):
    _run(tmp_path / "run")
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert _is_png(tmp_path / "run" / "dashboard.png")
    assert main(["plot", str(tmp_path / "run" / "metrics.jsonl"), "--out",
                 str(tmp_path / "x.png")]) == 0
    assert _is_png(tmp_path / "x.png")
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: p, "no metrics.jsonl"),
    (lambda p: (p / "r.txt").write_text("hi") and p / "r.txt", "not a .jsonl"),
    (lambda p: (p / "r.jsonl").write_text("{not json\n") and p / "r.jsonl", "not a gradkit"),
    (lambda p: (p / "r.sqlite").write_text("garbage" * 100) and p / "r.sqlite",
     "not a gradkit SQLite"),
    (lambda p: (p / "e.jsonl").write_text('{"step": 0}\n') and p / "e.jsonl", "no plottable"),
])
def test_cli_bad_runs_exit_2_with_one_line(tmp_path, capsys, setup, message):
    run = setup(tmp_path)
    assert main(["plot", str(run), "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("gradkit plot: error")


def test_cli_rejects_non_png_output(tmp_path, capsys):
    _run(tmp_path / "run", steps=1)
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "o.jpg")]) == 2
    assert ".png" in capsys.readouterr().err


def test_cli_module_import_is_cheap():
    code = ("import sys, gradkit.instruments.cli; "
            "print('torch' in sys.modules, 'matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    _run(tmp_path / "run", steps=1)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'gradkit\[plot\]'"):
        plot(tmp_path / "run", tmp_path / "a.png")


def test_records_reach_both_files_at_each_flush_interval(tmp_path):
    from gradkit.instruments.records import RunWriter

    writer = RunWriter(tmp_path, flush_every=3)

    def on_disk():
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
        with sqlite3.connect(tmp_path / "metrics.sqlite") as db:
            rows = db.execute("SELECT step, name, value, json FROM records").fetchall()
        return [json.loads(line)["step"] for line in lines], rows

    record = {"step": 0, "loss": 1.0, "idx": [1, 2]}
    writer.write(record)
    record["loss"] = 9.0  # the writer keeps its own copy of each record
    writer.write({"step": 1, "loss": 1.0, "idx": [1, 2]})
    assert on_disk() == ([], [])
    writer.write({"step": 2, "loss": float("inf")})
    steps, rows = on_disk()
    assert steps == [0, 1, 2]
    assert rows == [(0, "loss", 1.0, None), (0, "idx", None, "[1, 2]"),
                    (1, "loss", 1.0, None), (1, "idx", None, "[1, 2]"), (2, "loss", None, None)]
    writer.write({"step": 3, "loss": 2.0})
    writer.close()
    assert on_disk()[0] == [0, 1, 2, 3]
