"""``gradkit bench`` / ``gradkit report`` end to end on the tiny suite, and every error path."""

import csv
import importlib.util
import json
import os
import re
import sqlite3
import subprocess
import sys
from html import unescape
from pathlib import Path

import pytest

from gradkit.bench import optimizers
from tests.bench._helpers import REPORT_CSVS, report_content, run_cli

TINY = ("bench", "--suite", "tiny", "--optimizer", "sgd", "--optimizer", "adam", "--in-process",
        "--quiet")


def _trial_count(db):
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM trials").fetchone()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One serial run of the tiny suite with the default optimizer set while only sgd and
    adam are registered (the others must be skipped with a note), shared by several tests."""
    out = tmp_path_factory.mktemp("tiny") / "bench"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(optimizers, "registry_names", lambda: ["adam", "rmsprop", "sgd"])
        code, stdout, stderr = run_cli("bench", "--suite", "tiny", "--in-process", "--out",
                                       str(out))
    assert code == 0, stderr
    return out, stdout, stderr


def test_unregistered_default_optimizers_are_skipped_with_a_note(tiny_run):
    out, stdout, stderr = tiny_run
    html = unescape((out / "report" / "index.html").read_text())
    for name in ("diffgrad", "muon"):
        note = f"optimizer '{name}' is in the default set but not registered"
        assert note in stdout and note in stderr and html.count(note) == 1


def test_tiny_suite_end_to_end_then_rerun_skips_everything(tiny_run, tmp_path):
    out, stdout, _ = tiny_run
    # 2 workloads x 2 optimizers x (defaults + 2 quasi-random + 1 extra seed)
    assert _trial_count(out / "results.sqlite") == (16, 16)
    report = out / "report"
    for name in ("index.html", "profile.png", "curves_quadratic.png", "lr_logreg.png",
                 *REPORT_CSVS):
        assert (report / name).stat().st_size > 0, name
    assert "Leaderboard" in stdout and "wall time:" in stdout and str(report) in stdout
    with open(report / "final_metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["workload"], r["optimizer"]) for r in rows} == {
        (w, o) for w in ("quadratic", "logreg") for o in ("sgd", "adam")}
    assert all(r["seeds"] == "2" and r["complete"] == "True" for r in rows)
    html = (report / "index.html").read_text()
    assert "performance profile" in html and "lr_quadratic.png" in html
    first = report_content(report)

    code, stdout, _ = run_cli(*TINY, "--out", str(out))  # the same studies, named explicitly
    assert code == 0 and "ran 0 (none), 16 already finished" in stdout
    assert _trial_count(out / "results.sqlite") == (16, 16)
    assert report_content(report) == first

    code, stdout, _ = run_cli("report", str(out / "results.sqlite"), "--out",
                              str(tmp_path / "again"))
    assert code == 0 and "Leaderboard" in stdout
    assert report_content(tmp_path / "again") == first


def test_user_optimizer_and_workload_and_a_failing_optimizer(tmp_path):
    out = tmp_path / "user"
    code, _, stderr = run_cli(
        "bench", "--suite", "tiny", "--in-process", "--out", str(out),
        "--workload", "tests.bench.fixture_user:make_workload", "--workload", "quadratic",
        "--optimizer", "tests.bench.fixture_user:SignSGD",
        "--optimizer", "tests.bench.fixture_user:Exploding", "--optimizer", "sgd")
    assert code == 0, stderr
    assert "trial failed: linreg / tests.bench.fixture_user:Exploding" in stderr
    with open(out / "report" / "trials.csv") as fh:
        trials = list(csv.DictReader(fh))
    exploding = [t for t in trials if t["optimizer"].endswith(":Exploding")]
    others = [t for t in trials if not t["optimizer"].endswith(":Exploding")]
    assert exploding and all(t["status"] == "failed" for t in exploding)
    assert all(t["error"] == "RuntimeError: boom from Exploding.step" for t in exploding)
    assert others and all(t["status"] == "ok" for t in others)
    assert {t["workload"] for t in others} == {"linreg", "quadratic"}
    sign = [t for t in others if t["optimizer"].endswith(":SignSGD") and t["phase"] == "tune"]
    assert sorted(t["hparams"] for t in sign)[0] != sorted(t["hparams"] for t in sign)[-1]
    assert "Failed and diverged trials" in (out / "report" / "index.html").read_text()


def test_jobs_2_gives_the_same_trials_as_jobs_1(tiny_run, tmp_path):
    out = tmp_path / "jobs2"
    argv = [a for a in TINY if a != "--in-process"] + ["--jobs", "2"]
    code, _, stderr = run_cli(*argv, "--out", str(out))
    assert code == 0, stderr
    serial = report_content(tiny_run[0] / "report")
    assert report_content(out / "report") == serial
    assert len(serial["trials.csv"]) == 17  # header + 16 trials


def _assert_usage_error(tmp_path, argv, *fragments):
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, stderr = run_cli(*argv)
    assert code == 2 and stdout == "", (argv, stderr)
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in stderr, (fragment, stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    return stderr


@pytest.mark.parametrize("extra, fragments", [
    (["--workload", "nope"], ["unknown workload 'nope'", "quadratic, rosenbrock"]),
    (["--optimizer", "nope"], ["unknown optimizer 'nope'", "adam", "sgd", "module:Class"]),
    (["--optimizer", "sgd", "--optimizer", "sgd"], ["optimizers must be distinct"]),
    (["--optimizer", "tests.bench.fixture_user:NotAnOptimizer"],
     ["not a torch.optim.Optimizer subclass"]),
    (["--optimizer", "torch.optim:Nope"], ["has no attribute 'Nope'"]),
    (["--optimizer", "no_such_pkg.mod:Opt"], ["cannot import module 'no_such_pkg.mod'"]),
    (["--workload", "a:b:c"], ["malformed workload 'a:b:c'", "package.module:attribute"]),
    (["--workload", "mod:"], ["malformed workload"]),
    (["--workload", "tests.bench.fixture_user:broken_factory"], ["factory raised"]),
    (["--suite", "huge"], ["unknown suite 'huge'", "quick, full, tiny"]),
    (["--jobs", "0"], ["--jobs", "must be an integer from 1 to"]),
    (["--jobs", "two"], ["--jobs", "invalid integer 'two'"]),
    (["--jobs", "100000"], ["--jobs", "from 1 to 256"]),
    (["--jobs", "256"], ["--jobs 256 is more than 4 worker processes per CPU"]),
    (["--trials", "-1"], ["--trials", "from 0 to"]),
    (["--trials", "100000000"], ["--trials", "from 0 to 1000"]),
    (["--seeds", "100000"], ["--seeds", "from 1 to 100"]),
    (["--trial-timeout", "-3"], ["--trial-timeout", ">= 0"]),
    (["--out", ""], ["--out", "must not be empty"]),
    (["--db", " "], ["--db", "must not be empty"]),
    (["--device", "tpu"], ["invalid choice: 'tpu'"]),
    (["--diagnose", "grad_norm,hessian"], ["unknown instrument hessian", "sharpness"]),
    (["--optimizer", "adamw:wd=0.1"], ["AdamW takes no wd", "weight_decay"]),
    (["--optimizer", "adamw:lr=1..0.1"], ["lr=1..0.1 must be a range"]),
    (["--optimizer", "adamw:lr=fast"], ["lr='fast' is not a number"]),
    (["--in-process", "--backend", "ray"], ["exclude each other"]),
    (["--seeds", "1.5"], ["--seeds", "invalid integer"]),
    (["--backend", "spark"], ["invalid choice: 'spark'"]),
    (["--ray-address", "x:1"], ["--ray-address needs --backend ray"]),
    (["--resume"], ["--resume: no database"]),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, extra, fragments):
    argv = ["bench", "--out", str(tmp_path / "o"), *extra]
    stderr = _assert_usage_error(tmp_path, argv, *fragments)
    _assert_names_only_real_options(stderr)


def _assert_names_only_real_options(text):
    from gradkit.cli import build_parser

    parser = build_parser()
    real = {o for a in parser._subparsers._group_actions[0].choices["bench"]._actions
            for o in a.option_strings}
    real |= {o for a in parser._subparsers._group_actions[0].choices["report"]._actions
             for o in a.option_strings}
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))
    assert named <= real, named - real


def test_empty_out_does_not_write_into_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _assert_usage_error(tmp_path, ["bench", "--suite", "tiny", "--out", ""], "--out")


def test_cuda_without_a_gpu_is_refused(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    _assert_usage_error(tmp_path, ["bench", "--suite", "tiny", "--device", "cuda", "--out",
                                   str(tmp_path / "o")], "--device cuda", "no CUDA device")


def test_rerun_with_other_arguments_is_refused_and_says_what_differs(tiny_run, tmp_path):
    out = tiny_run[0]
    db = out / "results.sqlite"
    before = db.read_bytes()
    for extra, fragment in ((["--trials", "1"], "trials 2 -> 1"),
                            (["--optimizer", "adam"], "optimizers -sgd"),
                            (["--seeds", "3"], "seeds [0, 1] -> [0, 1, 2]")):
        code, stdout, stderr = run_cli("bench", "--suite", "tiny", "--in-process", "--out",
                                       str(out), *extra)
        assert code == 2 and stdout == "" and stderr.count("\n") == 1, stderr
        assert "made with other arguments" in stderr and fragment in stderr, stderr
        assert "another --out" in stderr
        _assert_names_only_real_options(stderr)
    assert db.read_bytes() == before


def test_a_second_run_on_the_same_database_is_refused_while_the_first_runs(tmp_path):
    from gradkit.bench.store import RunLock

    out = tmp_path / "o"
    out.mkdir()
    db = out / "results.sqlite"
    script = ("import sys, time; from pathlib import Path; "
              "from gradkit.bench.store import RunLock\n"
              "with RunLock(Path(sys.argv[1])):\n print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script, str(db)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  os.path.abspath(p) for p in sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, stdout, stderr = run_cli(*TINY, "--out", str(out))
        assert code == 2 and stdout == "" and stderr.count("\n") == 1, stderr
        assert f"another gradkit bench (pid {holder.pid}) is running" in stderr
        assert not db.exists()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(db):  # released when its holder died
        pass


def test_report_finds_the_database_inside_the_folder_and_never_writes_it(tiny_run, tmp_path):
    out = tiny_run[0]
    db = out / "results.sqlite"
    before = db.read_bytes()
    listing = sorted(p.name for p in out.iterdir())
    code, stdout, stderr = run_cli("report", str(out), "--out", str(tmp_path / "r"))
    assert code == 0, stderr
    assert "Leaderboard" in stdout and (tmp_path / "r" / "index.html").exists()
    assert db.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == listing


def test_plain_progress_lines_and_the_header_before_the_work(tmp_path):
    argv = [a for a in TINY if a != "--quiet"]
    code, stdout, stderr = run_cli(*argv, "--out", str(tmp_path / "o"), "--no-report")
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0].startswith("gradkit bench: suite tiny") and "16 trials to run" in lines[0]
    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == 16 and progress[0].startswith("[ 1/16] ")
    assert progress[-1].startswith("[16/16] ") and progress[-1].endswith(": ok")
    assert lines.index(progress[-1]) < lines.index(next(x for x in lines if "trials: ran" in x))


def test_optimizer_settings_on_the_command_line(tmp_path):
    out = tmp_path / "o"
    code, _, stderr = run_cli("bench", "--suite", "tiny", "--in-process", "--quiet", "--out",
                              str(out), "--workload", "quadratic", "--optimizer",
                              "adamw:weight_decay=0.25", "--optimizer", "sgd:lr=0.3..0.5",
                              "--no-report")
    assert code == 0, stderr
    with sqlite3.connect(out / "results.sqlite") as conn:
        rows = conn.execute("SELECT optimizer, hparams FROM trials").fetchall()
        spaces = dict(conn.execute("SELECT optimizer, space FROM studies").fetchall())
    hp = {}
    for name, text in rows:
        hp.setdefault(name, []).append(json.loads(text))
    assert set(hp) == {"adamw:weight_decay=0.25", "sgd:lr=0.3..0.5"}
    assert all(h["weight_decay"] == 0.25 for h in hp["adamw:weight_decay=0.25"])
    assert all(0.3 <= h["lr"] <= 0.5 for h in hp["sgd:lr=0.3..0.5"])
    assert "lr ~ log-uniform[0.3, 0.5]" in spaces["sgd:lr=0.3..0.5"]


def test_unwritable_output_paths(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    _assert_usage_error(tmp_path, ["bench", "--out", str(blocker / "out")],
                        "is not a directory")
    _assert_usage_error(tmp_path, ["bench", "--out", str(blocker)],
                        "exists and is not a directory")
    _assert_usage_error(tmp_path, ["bench", "--out", str(tmp_path / "o"), "--db",
                                           str(tmp_path)], "is a directory")
    if Path("/proc/self").is_dir():  # Linux: procfs refuses new files, even for root
        _assert_usage_error(tmp_path, ["bench", "--out", "/proc/gradkit-no"], "not writable")
    _assert_usage_error(tmp_path, ["bench", "--out", str(tmp_path / "o"), "--db",
                                           str(blocker)], "not a gradkit results database")


def test_report_errors(tmp_path):
    _assert_usage_error(tmp_path, ["report", str(tmp_path / "none.sqlite")],
                        "no results database")
    junk = tmp_path / "junk.sqlite"
    junk.write_text("junk" * 100)
    _assert_names_only_real_options(
        _assert_usage_error(tmp_path, ["report", str(junk)], "not a gradkit results"))
    _assert_usage_error(tmp_path, ["report", str(tmp_path)], "no results database")  # folder
    _assert_usage_error(tmp_path, ["report", ""], "must not be empty")


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="ray is installed")
def test_ray_backend_without_ray_says_how_to_install(tmp_path):
    _assert_usage_error(tmp_path, ["bench", "--backend", "ray", "--out",
                                           str(tmp_path / "o")], "pip install 'gradkit[ray]'")


def test_ray_backend_on_a_local_instance(tiny_run, tmp_path):
    pytest.importorskip("ray", reason="ray is not installed (extra gradkit[ray])")
    out = tmp_path / "ray"
    argv = [a for a in TINY if a != "--in-process"] + ["--jobs", "2"]
    code, _, stderr = run_cli(*argv, "--backend", "ray", "--out", str(out))
    assert code == 0, stderr
    assert report_content(out / "report") == report_content(tiny_run[0] / "report")


def test_list():
    code, stdout, _ = run_cli("bench", "--list")
    assert code == 0 and "quick" in stdout and "cnn" in stdout and "muon" in stdout


def test_diagnose_fills_the_diagnostics_table_and_changes_no_score(tiny_run, tmp_path):
    out = tmp_path / "diag"
    code, _, stderr = run_cli(*TINY, "--out", str(out), "--diagnose",
                              "grad_norm,sharpness,update_ratio,noise_scale")
    assert code == 0, stderr
    # same trials (keys), same outcomes, same report (step-based columns) as without it
    assert report_content(out / "report") == report_content(tiny_run[0] / "report")
    plain, diag = tiny_run[0] / "results.sqlite", out / "results.sqlite"
    query = ("SELECT key, status, steps_to_target, final_val_metric, final_test_metric "
             "FROM trials ORDER BY key")
    with sqlite3.connect(plain) as a, sqlite3.connect(diag) as b:
        assert a.execute(query).fetchall() == b.execute(query).fetchall()
        assert a.execute("SELECT COUNT(*) FROM diagnostics").fetchone() == (0,)
        rows = b.execute("SELECT t.workload, d.name, d.step, d.value FROM diagnostics d "
                         "JOIN trials t ON t.key = d.key").fetchall()
    by_name = {}
    for workload, name, step, value in rows:
        assert workload == "logreg"  # the quadratic's Problem has no probe(): no readings
        by_name.setdefault(name, []).append((step, value))
    assert set(by_name) == {"grad_norm", "sharpness", "update_ratio", "noise_scale"}
    assert all(v is not None and v > 0 for name in ("grad_norm", "sharpness", "update_ratio")
               for _, v in by_name[name])
    assert min(s for s, _ in by_name["grad_norm"]) == 0
    assert min(s for s, _ in by_name["update_ratio"]) > 0  # no update before step 1


_LAUNCHER = """\
import sys
from gradkit.cli import main
if __name__ == "__main__":  # as in the console script pip writes
    sys.exit(main())
"""


def _readme_files():
    """The ``# mypkg/...`` Python blocks of the README's 'Your own model and optimizer'."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```python\n(# (mypkg/[\w/]+\.py)\n.*?)```", text, flags=re.S)
    return {path: body for body, path in blocks}


def test_readme_user_optimizer_and_workload_run_from_the_users_directory(tmp_path):
    files = _readme_files()
    assert {"mypkg/optim.py", "mypkg/tasks.py"} <= set(files)
    project = tmp_path / "project"
    (project / "mypkg").mkdir(parents=True)
    (project / "mypkg" / "__init__.py").write_text("")
    for path, body in files.items():
        (project / path).write_text(body)
    launcher = tmp_path / "bin" / "gradkit"  # like the console script: not in the project
    launcher.parent.mkdir()
    launcher.write_text(_LAUNCHER)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    done = subprocess.run(
        [sys.executable, str(launcher), "bench", "--suite", "tiny", "--trials", "1",
         "--seeds", "1", "--jobs", "1", "--quiet", "--no-report",
         "--optimizer", "mypkg.optim:MyOptimizer", "--optimizer", "adamw:weight_decay=0.1",
         "--workload", "mypkg.tasks:make_workload"],
        cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ran 4 (4 ok)" in done.stdout, done.stdout
    assert (project / "gradkit-bench" / "results.sqlite").exists()


def test_cli_and_store_do_not_import_torch():
    code = ("import sys\n"
            "import gradkit.cli, gradkit.bench.cli, gradkit.bench.store, gradkit.bench.records\n"
            "gradkit.cli.build_parser()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root / "src")}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_output_folder_with_uri_characters_resumes(tmp_path):
    out = tmp_path / "runs #1?x=%41"
    argv = [*TINY, "--workload", "quadratic", "--no-report", "--out", str(out)]
    code, stdout, stderr = run_cli(*argv)
    assert code == 0 and "ran 8 (8 ok), 0 already finished" in stdout, stderr
    code, stdout, stderr = run_cli(*argv)
    assert code == 0 and "ran 0 (none), 8 already finished" in stdout, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    code, stdout, stderr = run_cli("report", str(out))
    assert code == 0 and (out / "report" / "index.html").exists(), stderr
