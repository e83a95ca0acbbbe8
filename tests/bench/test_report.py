"""The report on hand-made results: verdict, ranks, misses, wall-clock noise, layout, figures,
and that ``gradkit report`` never imports torch."""

from __future__ import annotations

import re
import subprocess
import sys
from html import unescape
from pathlib import Path

import numpy as np
import pytest

from gradkit.bench import analysis, plots, report
from gradkit.bench.analysis import Analysis, StudyResult
from gradkit.bench.records import CurvePoint, TrialRecord

WORKLOADS = ("alpha", "beta", "gamma")
STEPS = 100


def _record(w: str, o: str, seed: int, steps: int | None, *, secs_per_step: float = 0.01,
            status: str = "ok", lr: float = 0.01, index: int = 0, phase: str = "seed"
            ) -> TrialRecord:
    val = 0.95 if steps is not None else (None if status != "ok" else 0.5)
    return TrialRecord(
        status=status, steps_to_target=steps,
        seconds_to_target=None if steps is None else steps * secs_per_step,
        final_val_metric=val, final_test_metric=val,
        train_seconds=STEPS * secs_per_step, steps_done=STEPS if status == "ok" else 7,
        divergence="loss nan" if status == "diverged" else None,
        key=f"{w}-{o}-{seed}-{index}-{lr}", suite="t", version="1", workload=w, optimizer=o,
        hparams={"lr": lr}, seed=seed, phase=phase, trial_index=index)


def make_analysis(table: dict[str, list[list[int | None]]], baselines: set[str], *,
                  secs_per_step: float = 0.01, extra_tune: dict | None = None) -> Analysis:
    """``table[optimizer][w]`` = per-seed steps to target (None = missed) on WORKLOADS."""
    workloads = [{"name": w, "metric": "accuracy", "higher_is_better": True, "target": 0.9,
                  "steps": STEPS, "batch_size": 8, "eval_every": 10, "description": w}
                 for w in WORKLOADS]
    studies, trials = {}, []
    for o, per_workload in table.items():
        for w, seeds in zip(WORKLOADS, per_workload):
            final = [_record(w, o, s, steps, secs_per_step=secs_per_step)
                     for s, steps in enumerate(seeds)]
            final[0] = _record(w, o, 0, seeds[0], secs_per_step=secs_per_step, phase="tune")
            tune = [final[0], *(extra_tune or {}).get((w, o), [])]
            study = StudyResult(w, o, o in baselines, "lr ~ logU", len(tune) - 1,
                                list(range(len(seeds))), tune, final[0], final)
            studies[w, o] = study
            trials += final + tune[1:]
    return Analysis("t", "1", workloads, sorted(table), studies, [], trials)


def _board(a: Analysis) -> dict[str, analysis.Standing]:
    return {s.optimizer: s for s in a.standings}


# ------------------------------------------------------------------------------- verdict
def test_verdict_names_the_winner_its_workloads_and_its_speedup_with_an_interval():
    a = make_analysis({"adam": [[40, 44, 48]] * 3, "fast": [[20, 22, 24]] * 3}, {"adam"})
    text = analysis.verdict(a)
    assert text.startswith("fast ranks first")
    assert "fastest to the validation target on 3 of 3 workloads" in text
    assert "reaching it on 3 of 3" in text
    speedup = re.search(r"speedup in steps of ([\d.]+)× \[([\d.]+)–([\d.]+)\]", text)
    assert speedup and float(speedup.group(1)) == pytest.approx(2.0)
    assert float(speedup.group(2)) <= 2.0 <= float(speedup.group(3))
    assert "bootstrap" in text and "best torch.optim baseline" in text
    html = unescape(report.render_html(a, {}))
    assert html.index(text) < html.index("<h2>Leaderboard")  # the report opens with it


def test_verdict_and_intervals_are_reproducible():
    table = {"adam": [[40, 60, 50], [30, 35, 33], [70, None, 90]],
             "fast": [[20, 50, 30], [30, 25, 33], [None, 80, 60]]}
    first = make_analysis(table, {"adam"})
    again = make_analysis(table, {"adam"})
    assert analysis.verdict(first) == analysis.verdict(again)
    assert analysis.leaderboard(first) == analysis.leaderboard(again)


def test_identical_results_share_the_first_rank():
    a = make_analysis({"adam": [[40, 44, 48]] * 3, "twin": [[40, 44, 48]] * 3,
                       "slow": [[90, 95, 99]] * 3}, {"adam"})
    board = _board(a)
    assert board["adam"].rank == board["twin"].rank == 1 and board["slow"].rank == 3
    assert analysis.verdict(a).startswith("adam and twin share the first rank")
    ranks = [row[0] for row in analysis.leaderboard(a)[1]]
    assert ranks == [1, 1, 3]


def test_overlapping_intervals_share_a_rank_but_separated_ones_do_not():
    noisy = {"adam": [[40, 80, 60]] * 3, "other": [[45, 75, 55]] * 3,
             "clear": [[10, 11, 12]] * 3}
    board = _board(make_analysis(noisy, {"adam"}))
    assert board["clear"].rank == 1
    assert board["adam"].rank == board["other"].rank == 2


def test_a_missed_target_is_not_left_out_of_the_geometric_mean():
    # "lucky" reaches one target 4x faster than the baseline and misses the two others;
    # "steady" is 1.25x faster everywhere. Leaving misses out would rank lucky's 4x first.
    a = make_analysis({"adam": [[40, 40, 40], [50, 50, 50], [60, 60, 60]],
                       "lucky": [[10, 10, 10], [None] * 3, [None] * 3],
                       "steady": [[32, 32, 32], [40, 40, 40], [48, 48, 48]]}, {"adam"})
    board = _board(a)
    assert board["lucky"].missed_steps == 2
    assert board["lucky"].speedup_steps == pytest.approx((4 * 0.5 * 0.6) ** (1 / 3))
    assert board["lucky"].speedup_steps < board["steady"].speedup_steps
    row = next(r for r in report._leader_rows(a)[1] if r[1][0] == "lucky")
    assert row[5][1] == "missed 2 of 3"


def test_no_baseline_gives_no_speedup_and_says_so():
    a = make_analysis({"fast": [[20, 22, 24]] * 3, "slow": [[40, 44, 48]] * 3}, set())
    assert "No torch.optim baseline" in analysis.verdict(a)
    assert np.isnan(_board(a)["fast"].speedup_steps)


# ------------------------------------------------------------------ wall-clock and digits
def test_wall_clock_below_a_tenth_of_a_second_is_not_scored_and_is_greyed():
    a = make_analysis({"adam": [[40, 44, 48]] * 3, "fast": [[20, 22, 24]] * 3}, {"adam"},
                      secs_per_step=0.001)  # every time to target is < 0.1 s
    assert not a.timed().any()
    assert all(np.isnan(s.score_seconds) for s in a.standings)
    html = report.render_html(a, {})
    assert "Wall-clock is not scored" in html
    assert html.count("class='noise'") == 2 * len(WORKLOADS)  # every seconds cell
    text = report.summary_text(a)
    assert "0.022 [0.02–0.024]*" in text and "Wall-clock is not scored" in text


def test_wall_clock_above_the_threshold_is_scored():
    a = make_analysis({"adam": [[40, 44, 48]] * 3, "fast": [[20, 22, 24]] * 3}, {"adam"},
                      secs_per_step=0.01)
    assert a.timed().all()
    board = _board(a)
    assert board["fast"].score_seconds == pytest.approx(1.0)
    assert board["fast"].speedup_seconds == pytest.approx(2.0, rel=1e-6)
    assert "class='noise'" not in report.render_html(a, {})


@pytest.mark.parametrize("value, shown", [(0.123456, "0.123"), (1234.5, "1230"),
                                          (105.0, "105"), (2.0 / 3, "0.667"),
                                          (float("inf"), "∞"), (None, "–")])
def test_numbers_show_three_significant_digits(value, shown):
    assert report.fmt(value) == shown


# ----------------------------------------------------------------------------- layout
def _table_widths(html: str) -> list[int]:
    return [len(re.findall(r"<th>", t)) for t in re.findall(r"<table.*?</table>", html)]


def test_tables_stay_narrow_with_many_optimizers():
    names = [f"optimizer{k:02d}" for k in range(14)]
    a = make_analysis({o: [[30 + k, 31 + k, 32 + k]] * 3 for k, o in enumerate(names)},
                      {names[0]})
    html = report.render_html(a, {})
    # the leaderboard has a fixed set of 9 columns; the per-workload tables have one column
    # per workload (+ the optimizer), not one per optimizer
    widths = _table_widths(html)
    assert widths[0] == 9
    assert widths[1:4] == [len(WORKLOADS) + 1] * 3
    assert "max-width:1200px" in html and "white-space:normal" in html


# ---------------------------------------------------------------------------- glossary
def test_glossary_defines_the_terms():
    html = report.render_html(make_analysis({"adam": [[40] * 3] * 3}, {"adam"}), {})
    for term in ("score", "τ (tau)", "performance profile", "speedup", "95 % interval",
                 "rank", "time to target"):
        assert f"<dt>{term}</dt>" in unescape(html)
    assert "best torch.optim baseline" in unescape(html)


# ---------------------------------------------------------------------------- figures
@pytest.fixture
def figures(monkeypatch):
    """Keep the figures that ``plots`` saves, to inspect them."""
    pytest.importorskip("matplotlib")
    kept = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: kept.append(fig))
    yield kept
    plt = plots._pyplot()
    for fig in kept:
        plt.close(fig)


def test_styles_are_distinct_for_many_optimizers():
    from gradkit._plotting import series_styles

    names = [f"o{k}" for k in range(17)]
    sty = series_styles(names)
    assert len({s["color"] for s in sty.values()}) == 17
    many = series_styles([f"o{k}" for k in range(204)])
    assert len({(s["color"], s["marker"]) for s in many.values()}) == 204


def _legend_outside(fig) -> bool:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 1
    box = legends[0].get_window_extent(renderer)
    return all(box.x0 >= ax.get_window_extent(renderer).x1 - 1 for ax in fig.axes)


def test_diverged_configurations_are_marked_apart_from_measured_values(figures, tmp_path):
    bad = [_record("alpha", "adam", 0, None, status="diverged", lr=1.0, index=1,
                   phase="tune")]
    names = [f"opt{k}" for k in range(12)]
    a = make_analysis({o: [[30, 31, 32]] * 3 for o in names} | {"adam": [[40] * 3] * 3},
                      {"adam"}, extra_tune={("alpha", "adam"): bad})
    plots.lr_sensitivity(a, a.workloads[0], tmp_path / "lr.png")
    fig = figures[-1]
    strip, main = fig.axes[0], fig.axes[1]
    measured_x = [x for line in main.get_lines() if line.get_label() != "target"
                  for x in np.atleast_1d(line.get_xdata())]
    assert 1.0 not in measured_x  # never drawn at a value in the main axes
    marks = [line for line in strip.get_lines() if line.get_marker() == "x"]
    assert [list(line.get_xdata()) for line in marks] == [[1.0]]
    assert [t.get_text() for t in strip.get_yticklabels()] == ["adam"]
    labels = [t.get_text() for t in main.get_legend().get_texts()]
    assert "diverged (strip above)" in labels and labels[:13] == sorted([*names, "adam"])
    assert _legend_outside(fig)


def test_curves_mark_a_diverged_seed_at_the_step_it_stopped(figures, tmp_path):
    a = make_analysis({"adam": [[40] * 3] * 3, "wild": [[30] * 3] * 3}, {"adam"})
    study = a.studies["alpha", "wild"]
    study.final[2] = _record("alpha", "wild", 2, None, status="diverged")
    curves = {r.key: [CurvePoint(0, 0.0, None, 1.0, 0.1), CurvePoint(10, 0.1, 0.5, 0.5, 0.95)]
              for s in a.studies.values() for r in s.final}
    plots.workload_curves(a, a.workloads[0], curves, tmp_path / "c.png")
    fig = figures[-1]
    strips = [ax for ax in fig.axes if [t.get_text() for t in ax.get_yticklabels()] == ["wild"]]
    assert len(strips) == 2
    for strip in strips:
        assert [list(line.get_xdata()) for line in strip.get_lines()] == [[7.0]]
    assert _legend_outside(fig)


def test_performance_profile_has_its_legend_outside(figures, tmp_path):
    a = make_analysis({f"o{k}": [[30 + k] * 3] * 3 for k in range(12)}, {"o0"})
    plots.performance_profile(a, tmp_path / "p.png")
    assert _legend_outside(figures[-1])


# ------------------------------------------------------------------------------- torch
REPORT_MODULES = ("gradkit.bench.report", "gradkit.bench.analysis", "gradkit.bench.plots",
                  "gradkit.bench.scoring", "gradkit.bench.store", "gradkit.bench.records")


def _no_torch(code: str) -> subprocess.CompletedProcess:
    src = str(Path(__file__).resolve().parents[2] / "src")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"}, timeout=120)


def test_report_modules_do_not_import_torch():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in REPORT_MODULES)
            + "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "assert not bad, bad[:5]\nprint('ok')\n")
    done = _no_torch(code)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# ------------------------------------------------------------------------- diagnostics
def _diagnosed():
    from gradkit.bench.records import Diagnostic

    bad = _record("alpha", "wild", 0, None, status="diverged", lr=1.0, index=1, phase="tune")
    a = make_analysis({"adam": [[40] * 3] * 3, "wild": [[30] * 3] * 3}, {"adam"},
                      extra_tune={("alpha", "wild"): [bad]})
    readings = {bad.key: [Diagnostic(0, "grad_norm", 1.0), Diagnostic(0, "sharpness", 0.5),
                          Diagnostic(5, "grad_norm", 10.0), Diagnostic(5, "sharpness", 3.0)]}
    for s in a.studies.values():
        for r in s.final:
            readings[r.key] = [Diagnostic(0, "sharpness", 10.0), Diagnostic(10, "sharpness",
                                                                             20.0)]
    return a, bad, readings


def test_diverged_configuration_shows_its_sharpness_against_two_over_lr():
    a, _, readings = _diagnosed()
    headers, rows = analysis.divergence_table(a, readings)
    assert headers[-2:] == ["2/lr", "sharpness / (2/lr)"]
    assert rows == [["alpha", "wild", 1, 0, 1.0, 7, 5, 10.0, 3.0, 2.0, 1.5]]
    html = unescape(report.render_html(a, {}, readings))
    assert "Diverged configurations: last readings before they stopped" in html
    assert "<td>1.5</td>" in html
    roles = {role for role, _ in analysis.diagnosed_trials(a)}
    assert roles == {"selected", "diverged"}
    _, long_rows = analysis.diagnostics_table(a, readings)
    assert len(long_rows) == sum(len(v) for v in readings.values())


def test_without_diagnostics_there_is_no_section_and_no_figure(figures, tmp_path):
    a, _, _ = _diagnosed()
    assert "Diagnostics" not in report.render_html(a, {}, {})
    assert plots.diagnostics(a, a.workloads[0], {}, tmp_path / "d.png") is False
    assert figures == []


def test_diagnostics_figure_draws_sharpness_relative_to_the_threshold(figures, tmp_path):
    a, _, readings = _diagnosed()
    assert plots.diagnostics(a, a.workloads[0], readings, tmp_path / "d.png")
    fig = figures[-1]
    sharp = next(ax for ax in fig.axes if ax.get_title().endswith("sharpness"))
    assert sharp.get_ylabel() == "sharpness / (2/η)"
    lines = sharp.get_lines()
    assert any(list(line.get_ydata()) == [1.0, 1.0] for line in lines)  # the threshold
    ends = [(line.get_xdata()[0], line.get_ydata()[0]) for line in lines
            if line.get_marker() == "x"]
    assert ends == [(5, 1.5)]
    selected = [line for line in lines
                if line.get_linewidth() == 1.5 and len(line.get_xdata()) > 1]
    # adam's and wild's selected configurations: sharpness 10, 20 at lr 0.01 -> 0.05, 0.1
    assert [list(line.get_ydata()) for line in selected] == [[0.05, 0.1]] * 2
    assert _legend_outside(fig)


def _write_database(path: Path) -> None:
    """A small results database written through the store's API (no torch involved)."""
    from types import SimpleNamespace

    from gradkit.bench.records import Diagnostic, TrialOutcome
    from gradkit.bench.store import Store

    info = {"metric": "accuracy", "higher_is_better": True, "target": 0.9, "steps": STEPS,
            "batch_size": 8, "eval_every": 10, "description": "made by hand"}
    store = Store.create(path)
    store.declare("t", "1", [(w, w, info) for w in WORKLOADS[:2]],
                  [{"workload": w, "optimizer": o, "space": "lr ~ logU(1e-3, 1)",
                    "torch_baseline": o == "adam", "n_trials": 1, "seeds": [0, 1]}
                   for w in WORKLOADS[:2] for o in ("adam", "mine")], [])
    for w in WORKLOADS[:2]:
        for o, steps in (("adam", 40), ("mine", 20)):
            for index, seed, phase, lr in ((0, 0, "tune", 0.01), (1, 0, "tune", 1.0),
                                           (0, 1, "seed", 0.01)):
                key = f"{w}-{o}-{index}-{seed}"
                task = SimpleNamespace(key=key, suite="t", hparams=f'{{"lr": {lr}}}',
                                       seed=seed, phase=phase, index=index)
                curve = tuple(CurvePoint(s, s * 0.01, 1.0 / (s + 1), 1.0, 0.5 + s / 100)
                              for s in range(0, STEPS + 1, 10))
                diag = (Diagnostic(0, "sharpness", 5.0), Diagnostic(10, "sharpness", 300.0))
                if lr == 1.0:
                    outcome = TrialOutcome("diverged", steps_done=12, train_seconds=0.12,
                                           divergence="training loss nan", curve=curve[:2],
                                           diagnostics=diag)
                else:
                    outcome = TrialOutcome("ok", steps, steps * 0.01, 0.1, 0.2, 0.95, 0.2, 0.94,
                                           1.0, STEPS, curve=curve, diagnostics=diag)
                store.record(task, "1", w, o, outcome)
    store.close()


def test_gradkit_report_runs_without_importing_torch(tmp_path):
    pytest.importorskip("matplotlib")
    db = tmp_path / "results.sqlite"
    _write_database(db)
    out = tmp_path / "report"
    code = (
        "import sys\nfrom gradkit.cli import main\n"
        f"rc = main(['report', {str(db)!r}, '--out', {str(out)!r}])\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert rc == 0 and not bad, (rc, bad[:5])\nprint('ok')\n")
    done = _no_torch(code)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
    html = unescape((out / "index.html").read_text())
    assert html.index("mine ranks first") < html.index("<h2>Leaderboard")
    assert "Diverged configurations: last readings before they stopped" in html
    for name in ("profile.png", "lr_alpha.png", "curves_beta.png", "diagnostics_alpha.png",
                 "diagnostics.csv", "leaderboard.csv"):
        assert (out / name).stat().st_size > 0, name
    assert "mine ranks first" in done.stdout


def test_signed_readings_with_outliers_get_a_symlog_axis():
    plt = pytest.importorskip("matplotlib.pyplot")
    fig, ax = plt.subplots()
    plots._log_scale(ax, [10.0, -20.0, 30.0, 8e5, 12.0])  # a noise scale can be < 0
    assert ax.get_yscale() == "symlog"
    plots._log_scale(ax2 := fig.add_subplot(2, 1, 2), [0.01, 0.5, 3.0])
    assert ax2.get_yscale() == "log"
    plt.close(fig)
