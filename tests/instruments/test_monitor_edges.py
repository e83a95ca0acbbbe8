"""The Monitor at its edges: short runs, diverging runs, schedules from step 0, damaged or
full disks, interpreter exit, several runs in one directory, TensorBoard and MLflow."""

import gc
import os
import sqlite3
import subprocess
import sys
import textwrap
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from gradkit.cli import main
from gradkit.errors import MissingExtraError
from gradkit.instruments import (
    GradNorm,
    Loss,
    Monitor,
    Sharpness,
    StepContext,
    load_run,
    load_runs,
)

ce = nn.functional.cross_entropy
ROOT = Path(__file__).resolve().parents[2]


def _digits_like(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _readme_loop(log_dir, steps=40, lr=0.1, **kwargs):
    """The README snippet, verbatim in shape."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    loss_fn = ce
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = _digits_like()
    loader = [(x, y)] * steps
    with Monitor(model, loss_fn, optimizer, log_dir=log_dir, **kwargs) as monitor:
        for inputs, targets in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            with monitor.step((inputs, targets), loss=loss):
                optimizer.step()
    return monitor


def _figure(run_dir):
    from gradkit.instruments.dashboard import dashboard_figure

    return dashboard_figure(load_runs(run_dir), "t")


def test_readme_snippet_on_a_40_step_run_gives_a_readable_dashboard(tmp_path):
    import matplotlib.pyplot as plt

    mon = _readme_loop(tmp_path)
    series = load_run(tmp_path)
    assert series["loss"][0] == list(range(40))  # the loss at every step by default
    assert len(series["grad_norm"][0]) >= 4
    assert series["m_coherence"][0] == [0]  # measured once: must still be visible
    fig = _figure(tmp_path)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert {"loss", "gradient norm", "coherence"} <= {ax.get_title() for ax in panels}
    for ax in panels:
        lo, hi = ax.get_xlim()
        assert lo < 0 and 39 < hi < 42, (ax.get_title(), lo, hi)  # the run's step range
        for line in ax.get_lines():
            if line.get_linestyle() != "--" and len(line.get_xdata()) <= 60:
                assert line.get_marker() not in (None, "None", ""), ax.get_title()
    plt.close(fig)
    assert mon.first_nonfinite is None


def test_a_diverging_run_warns_once_and_the_dashboard_marks_it(tmp_path):
    import matplotlib.pyplot as plt

    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=5.0)  # far above 2/λ_max: diverges
    x = torch.randn(64, 8) * 3
    y = torch.randn(64, 1)
    mse = nn.functional.mse_loss
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Monitor(model, mse, opt, instruments=[Loss(), GradNorm()], log_dir=tmp_path) as mon:
            for _ in range(120):
                opt.zero_grad()
                loss = mse(model(x), y)
                loss.backward()
                with mon.step((x, y), loss=loss):
                    opt.step()
    diverged = [w for w in caught if "diverged" in str(w.message)]
    assert len(diverged) == 1 and issubclass(diverged[0].category, RuntimeWarning)
    first, key, _ = mon.first_nonfinite
    assert key in ("loss", "grad_norm") and 0 < first < 120
    steps, values = load_run(tmp_path)[key]
    assert values[steps.index(first)] is None and None not in values[:steps.index(first)]
    fig = _figure(tmp_path)
    for ax in (a for a in fig.axes if a.get_title()):
        marks = [ln for ln in ax.get_lines() if list(ln.get_xdata()) == [first, first]]
        assert marks and marks[0].get_color() == "red", ax.get_title()
    plt.close(fig)


def test_a_dense_head_schedule_and_its_next_due():
    ins = Loss(every=10, start=3, dense_until=20)
    due = [t for t in range(60) if ins.due(t)]
    assert due == [*range(3, 20), 23, 33, 43, 53]
    assert [ins.next_due(t) for t in (0, 5, 19, 20, 24)] == [3, 5, 19, 23, 33]
    with pytest.raises(ValueError, match="dense_until"):
        Loss(dense_until=-1)


def test_every_override_is_honoured_from_step_0():
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _digits_like(16)
    mon = Monitor(model, ce, opt, every={"sharpness": 10})
    for _ in range(21):
        mon.step((x, y))
    mon.close()
    assert mon.series("sharpness")[0] == [0, 10, 20]
    with pytest.warns(UserWarning, match="first runs at step 50"):
        Monitor(model, ce, opt, instruments=[Sharpness(start=50)], every={"sharpness": 10})


def _write_run(log_dir, steps, **kwargs):
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    mon = Monitor(model, ce, instruments=[Loss()], log_dir=log_dir, **kwargs)
    for _ in range(steps):
        mon.step((x, y), loss=ce(model(x), y))
    mon.close()
    return mon


def test_a_truncated_last_jsonl_line_is_skipped_and_then_removed(tmp_path):
    first = _write_run(tmp_path, 5)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "run": "x", "lo')  # a writer killed mid-line
    with pytest.warns(RuntimeWarning, match="truncated last line"):
        assert load_run(tmp_path)["loss"][0] == [0, 1, 2, 3, 4]
    with pytest.warns(RuntimeWarning, match="removed a truncated last line"):
        second = _write_run(tmp_path, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runs = load_runs(tmp_path)
    assert list(runs) == [first.run_id, second.run_id]
    assert runs[second.run_id]["loss"][0] == [0, 1, 2]
    with pytest.raises(ValueError, match="not a gradkit record"):  # damage elsewhere: an error
        (tmp_path / "bad.jsonl").write_text('{"step": 0}\n{"ste\n{"step": 1}\n')
        load_run(tmp_path / "bad.jsonl")


_FULL_DISK_THEN_CTRL_C = textwrap.dedent("""
    import resource, signal, sys
    sys.modules["mlflow"] = sys.modules["tensorboard"] = None  # core needs neither
    import torch
    from torch import nn
    from gradkit.instruments import Instrument, Loss, Monitor

    class Pad(Instrument):  # makes the files grow fast
        name = "pad"
        touches_model = False
        def measure(self, ctx):
            return {"pad": "x" * 2000}

    ce = nn.functional.cross_entropy
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    # 1. a full disk: writes past a file-size limit fail (EFBIG) in the middle of training
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    mon = Monitor(model, ce, opt, instruments=[Loss(), Pad()], log_dir=sys.argv[1],
                  flush_every=4)
    resource.setrlimit(resource.RLIMIT_FSIZE, (96 * 1024, resource.RLIM_INFINITY))
    for step in range(40):
        opt.zero_grad()
        loss = ce(model(x), y)
        loss.backward()
        with mon.step((x, y), loss=loss):
            opt.step()
    mon.close()
    print("trained", len(mon.history), flush=True)
    # 2. the plain form, interrupted: no close(), records still buffered
    monitor = Monitor(model, ce, instruments=[Loss()], log_dir=sys.argv[2], flush_every=50)
    for step in range(7):
        monitor.step((x, y), loss=ce(model(x), y))
    raise KeyboardInterrupt  # Ctrl-C
""")


def test_a_full_disk_degrades_and_the_plain_form_flushes_at_interpreter_exit(tmp_path):
    """One subprocess (a file-size limit and an interrupted interpreter; neither mlflow nor
    tensorboard importable) for two behaviours, to pay for one torch import."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    full, plain = tmp_path / "full", tmp_path / "plain"
    out = subprocess.run([sys.executable, "-c", _FULL_DISK_THEN_CTRL_C, str(full), str(plain)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert "trained 40" in out.stdout, out.stderr[-2000:]
    assert "KeyboardInterrupt" in out.stderr
    # the full disk: one warning, training went on, both files hold the same records
    assert out.stderr.count("could not write records") == 1, out.stderr[-2000:]
    assert "records could not be written" in out.stderr
    from_jsonl = load_runs(full / "metrics.jsonl")
    from_sqlite = load_runs(full / "metrics.sqlite")
    assert from_jsonl == from_sqlite
    (steps,) = {tuple(s["loss"][0]) for s in from_jsonl.values()}
    assert 0 < len(steps) < 40 and list(steps) == list(range(len(steps)))
    # the interrupted plain form: every record reached both files at exit
    assert load_run(plain)["loss"][0] == list(range(7))
    assert load_run(plain / "metrics.sqlite")["loss"][0] == list(range(7))


def test_an_unclosed_monitor_is_not_kept_alive(tmp_path):
    mon = Monitor(nn.Linear(3, 2), ce, instruments=[Loss()], log_dir=tmp_path)
    ref = weakref.ref(mon)
    del mon
    gc.collect()
    assert ref() is None


def test_two_monitors_on_one_log_dir_are_separate_runs(tmp_path, capsys):
    torch.manual_seed(0)
    models = [nn.Linear(3, 2), nn.Linear(3, 2)]
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    mons = [Monitor(m, ce, instruments=[Loss()], log_dir=tmp_path, flush_every=2)
            for m in models]
    assert mons[0].run_id != mons[1].run_id
    for _ in range(5):  # interleaved writes
        for m, mon in zip(models, mons):
            mon.step((x, y), loss=ce(m(x), y))
    for mon in mons:
        mon.close()
    for path in (tmp_path / "metrics.jsonl", tmp_path / "metrics.sqlite"):
        runs = load_runs(path)
        assert set(runs) == {mon.run_id for mon in mons}
        for mon in mons:
            assert runs[mon.run_id]["loss"] == tuple(map(list, mon.series("loss")))
    assert load_run(tmp_path, run=mons[0].run_id)["loss"][1] == mons[0].series("loss")[1]
    with pytest.warns(UserWarning, match="holds 2 runs"):
        load_run(tmp_path)
    # a rerun on the same directory is a third run
    _write_run(tmp_path, 2)
    assert len(load_runs(tmp_path)) == 3
    assert main(["plot", str(tmp_path), "--run", mons[1].run_id]) == 0
    assert main(["plot", str(tmp_path), "--run", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_gradkit_plot_leaves_no_wal_or_shm_files(tmp_path):
    _write_run(tmp_path, 3)
    assert main(["plot", str(tmp_path / "metrics.sqlite"), "--out",
                 str(tmp_path / "d.png")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "d.png", "metrics.jsonl", "metrics.sqlite"]


def test_a_file_written_before_run_ids_still_reads(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.5}\n')
    with sqlite3.connect(tmp_path / "metrics.sqlite") as db:
        db.execute("CREATE TABLE records (step INTEGER, name TEXT, value REAL, json TEXT)")
        db.execute("INSERT INTO records VALUES (0, 'loss', 1.0, NULL)")
    db.close()
    assert load_runs(tmp_path) == {"": {"loss": ([0, 1], [1.0, 0.5])}}
    new = _write_run(tmp_path, 1)  # appends a run to the old-schema database
    runs = load_runs(tmp_path / "metrics.sqlite")
    assert list(runs) == ["", new.run_id] and runs[""]["loss"] == ([0], [1.0])


def test_step_context_holds_no_reference_to_the_monitor():
    seen = []

    class Grab(Loss):
        def measure(self, ctx):
            seen.append(ctx)
            return super().measure(ctx)

    model = nn.Linear(3, 2)
    mon = Monitor(model, ce, instruments=[Grab()])
    mon.step((torch.randn(4, 3), torch.tensor([0, 1, 0, 1])), loss=1.0)
    ctx = seen[0]
    assert isinstance(ctx, StepContext)
    for value in vars(ctx).values():  # no attribute is the Monitor or one of its methods
        assert value is not mon and getattr(value, "__self__", None) is not mon
    assert ctx.model is model and ctx.loss == 1.0 and sorted(ctx.params()) == ["bias", "weight"]


# ------------------------------------------------------------------ TensorBoard / MLflow


def test_tensorboard_sink_reads_back_with_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mon = _readme_loop(tmp_path, steps=12, tensorboard=True)
    acc = EventAccumulator(str(tmp_path / "tensorboard" / mon.run_id))
    acc.Reload()
    assert {"loss", "grad_norm"} <= set(acc.Tags()["scalars"])
    for name in ("loss", "grad_norm"):
        events = acc.Scalars(name)
        steps, values = mon.series(name)
        assert [e.step for e in events] == steps
        assert [e.value for e in events] == pytest.approx(values, rel=1e-6)


def test_mlflow_sink_logs_to_a_file_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks to opt in
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    mon = _readme_loop(tmp_path / "run", steps=12, mlflow=uri, mlflow_experiment="edges")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("edges")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags["gradkit.run_id"] == mon.run_id and run.info.status == "FINISHED"
    for name in ("loss", "grad_norm"):
        history = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
        steps, values = mon.series(name)
        assert [m.step for m in history] == steps
        assert [m.value for m in history] == pytest.approx(values, rel=1e-12)
    # the active run, when there is one, receives the records and is left open
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run() as active:
            _readme_loop(None, steps=3, mlflow=True)
            assert mlflow.active_run().info.run_id == active.info.run_id
        got = client.get_metric_history(active.info.run_id, "loss")
        assert sorted(m.step for m in got) == [0, 1, 2]
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("kwargs, extra", [({"mlflow": True}, "mlflow"),
                                           ({"tensorboard": True}, "tensorboard")])
def test_missing_mlflow_or_tensorboard_is_a_clear_error(tmp_path, monkeypatch, kwargs, extra):
    monkeypatch.setitem(sys.modules, extra, None)  # as if not installed
    with pytest.raises(MissingExtraError, match=rf"pip install 'gradkit\[{extra}\]'"):
        Monitor(nn.Linear(2, 2), ce, log_dir=tmp_path / "r", **kwargs)
    assert not (tmp_path / "r").exists()
