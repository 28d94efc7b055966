"""Smoke test: the real ``esper train`` entry point with a tiny budget, then ``esper runs`` and
``esper report`` on what it left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from esper.tolaria.config import load_config
from esper.tolaria.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _esper(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "esper.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("smoke")
    result = _esper(
        "train",
        "--config",
        str(ROOT / "configs" / "digits.yaml"),
        "train.epochs=3",
        f"run.dir={root / 'runs'}",
        "run.id=smoke",
        "growth.start_step=10",
        "growth.decide_every=10",
        "growth.graft_delay=4",
        "growth.evaluation_steps=10",
        "growth.max_parameter_fraction=5",
        "urza.worker=process",  # the compile worker as a child process of the run
        cwd=root,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "run smoke completed at epoch 3" in result.stdout
    return root / "runs" / "smoke"


def test_the_run_folder_has_config_metrics_checkpoints_and_report(run_folder: Path) -> None:
    config = load_config(run_folder / "config.yaml")
    info = json.loads((run_folder / "run.json").read_text())
    records = list(read_metrics(run_folder / "metrics.jsonl"))
    kinds = {r["type"] for r in records}
    epochs = [r for r in records if r["type"] == "epoch"]

    assert config.train.epochs == 3 and config.growth.decide_every == 10
    assert {"eval", "step", "epoch", "seed", "decision", "graft"} <= kinds
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert info["status"] == "completed" and info["epoch"] == 3
    assert info["test_score"] == epochs[-1]["test_score"] > 0.5
    assert info["summary"]["grafts"] >= 1
    assert info["summary"]["final_parameters"] > info["initial_parameters"]
    assert info["warm_up_seconds"] > 0  # the run waited for its precompiles before step 1
    cache = info["kernel_cache"]  # the run's kernel cache counters, as in the report
    assert cache["misses"] >= 1 and 0.0 <= cache["hit_rate"] <= 1.0
    assert "compiled residual_mlp" in (run_folder / "tezzeret.log").read_text()
    checkpoints = sorted(p.name for p in (run_folder / "checkpoints").iterdir())
    assert checkpoints == ["epoch-0001", "epoch-0002", "epoch-0003"]
    tensors = torch.load(
        run_folder / "checkpoints" / "epoch-0003" / "tensors.pt", weights_only=True
    )
    assert any(".seeds." in key for key in tensors["model"])  # the grafted kernels are saved
    report = (run_folder / "report.md").read_text()
    assert "# Run smoke" in report and "| **final** |" in report
    plots = sorted(p.name for p in (run_folder / "plots").glob("*.png"))
    assert plots == ["loss_score.png", "parameters.png", "seed_timeline.png", "step_time.png"]
    assert all((run_folder / "plots" / p).read_bytes()[:8] == PNG_MAGIC for p in plots)


def test_esper_runs_lists_it(run_folder: Path) -> None:
    result = _esper("runs", "--dir", str(run_folder.parent), cwd=run_folder.parent)

    assert result.returncode == 0, result.stderr
    assert "smoke" in result.stdout and "completed" in result.stdout and "3/3" in result.stdout


def test_esper_report_regenerates_the_report(run_folder: Path) -> None:
    (run_folder / "report.md").unlink()
    for plot in (run_folder / "plots").glob("*.png"):
        plot.unlink()

    result = _esper("report", str(run_folder), cwd=run_folder.parent)

    assert result.returncode == 0, result.stderr
    assert "| **final** |" in (run_folder / "report.md").read_text()
    assert len(list((run_folder / "plots").glob("*.png"))) == 4


def test_a_bad_override_fails_with_the_valid_keys(tmp_path: Path) -> None:
    result = _esper(
        "train", "--config", str(ROOT / "configs" / "digits.yaml"), "train.epoch=1", cwd=tmp_path
    )

    assert result.returncode == 2
    assert "unknown key 'train.epoch'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()
