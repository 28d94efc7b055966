"""Reports: seed timelines, summaries, report.md with PNG plots, and the run listing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from esper.tolaria.metrics import MetricsLog
from esper.tolaria.plots import seed_intervals
from esper.tolaria.report import summarize, write_report
from esper.tolaria.run_folder import RunFolder, list_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_seed_intervals_follow_state_changes() -> None:
    events = [
        {"step": 0, "layer": "fc1", "seed": 0, "state": "DORMANT"},
        {"step": 10, "layer": "fc1", "seed": 0, "state": "BLENDING"},
        {"step": 40, "layer": "fc1", "seed": 0, "state": "ACTIVE"},
    ]

    assert seed_intervals(events, 100) == {
        ("fc1", 0): [(0, 10, "DORMANT"), (10, 40, "BLENDING"), (40, 100, "ACTIVE")]
    }


def _fake_run(root: Path) -> RunFolder:
    folder = RunFolder.create(root, "fake-run")
    folder.config_path.write_text("run: {}\n")
    folder.write_info(
        status="completed",
        dataset="digits",
        host="mlp",
        policy="bottleneck",
        score_name="accuracy",
        initial_parameters=100,
        layer_seeds={"fc1": 1, "out": 1},
        started_at="2026-01-01T00:00:00",
        epochs=2,
        epoch=2,
        test_score=0.9,
    )
    log = MetricsLog(folder.metrics_path)
    log.write("eval", epoch=0, step=0, test_loss=2.3, test_score=0.1)
    for step in range(1, 21):
        log.write(
            "step",
            step=step,
            epoch=1 + (step > 10),
            loss=1.0 / step,
            step_time_ms=5.0 + (step == 15),
            parameters=100 if step < 12 else 140,
            seeds={"DORMANT": 2},
            compiling=int(8 <= step < 12),
        )
    log.write(
        "decision",
        step=8,
        action="germinate",
        layer="fc1",
        seed=0,
        blueprint="mlp_h32",
        policy="bottleneck",
        confidence=0.9,
        decision_id="d1",
    )
    log.write("refusal", step=9, action="germinate", layer="out", gate="cooldown", reason="hot")
    log.write("graft", step=12, layer="fc1", seed=0, blueprint="mlp_h32", kernel_parameters=40)
    log.write("seed", step=12, layer="fc1", seed=0, state="BLENDING")
    log.write(
        "reward", step=18, layer="fc1", seed=0, decision_id="d1", total=0.25, outcome="fossilize"
    )
    log.write("fossilize", step=18, layer="fc1", seed=0)
    log.write(
        "epoch", epoch=1, step=10, train_loss=0.5, test_loss=0.6, test_score=0.8, parameters=100
    )
    log.write(
        "epoch", epoch=2, step=20, train_loss=0.3, test_loss=0.4, test_score=0.9, parameters=140
    )
    log.flush()
    return folder


def test_summary_counts_growth_and_reads_scores(tmp_path: Path) -> None:
    summary = summarize(_fake_run(tmp_path))

    assert (summary.initial_parameters, summary.final_parameters) == (100, 140)
    assert (summary.initial_test_score, summary.final_test_score) == (0.1, 0.9)
    assert summary.test_score_before_growth == 0.8  # last epoch before the graft at step 12
    assert (summary.germinations, summary.grafts, summary.fossilized, summary.culled) == (
        1,
        1,
        1,
        0,
    )
    assert summary.refusals_by_gate == {"cooldown": 1}
    assert summary.step_time is not None and summary.step_time.compiling_steps == 4


def test_report_has_the_tables_and_four_png_plots(tmp_path: Path) -> None:
    folder = _fake_run(tmp_path)

    path = write_report(folder.path)

    text = path.read_text()
    assert "| **final** | **140** | **0.9000** | 0.4000 |" in text
    assert "| fc1 | 0 | mlp_h32 | 12 | 40 | fossilize @ 18 |" in text
    assert "| 9 | germinate | out | cooldown | hot |" in text
    assert "0.2500" in text  # the decision's reward
    for name in ("loss_score", "seed_timeline", "parameters", "step_time"):
        assert f"plots/{name}.png" in text
        assert (folder.plots_dir / f"{name}.png").read_bytes()[:8] == PNG_MAGIC


def test_list_runs_reads_every_run_folder(tmp_path: Path) -> None:
    _fake_run(tmp_path)
    (tmp_path / "not-a-run").mkdir()

    rows = list_runs(tmp_path)

    assert [(r.run_id, r.status, r.dataset, r.epoch, r.test_score) for r in rows] == [
        ("fake-run", "completed", "digits", 2, 0.9)
    ]


def test_without_matplotlib_the_report_has_the_tables_and_says_how_to_get_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    folder = _fake_run(tmp_path)

    text = write_report(folder.path).read_text()

    assert "pip install 'esper-morphogenetic[report]'" in text
    assert "| **final** | **140** | **0.9000** | 0.4000 |" in text
    assert list(folder.plots_dir.glob("*.png")) == []
