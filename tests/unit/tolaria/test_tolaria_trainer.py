"""The run loop: what a run leaves in its folder, and growth that is deterministic in step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from esper.errors import ConfigurationError
from esper.tolaria.config import load_config
from esper.tolaria.metrics import read_metrics
from esper.tolaria.trainer import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

GROWTH = [
    "data.name=digits",
    "host.hidden=[16]",
    "host.activation=identity",
    "seeds.per_layer=2",
    "seeds.blend_steps=5",
    "growth.start_step=10",
    "growth.decide_every=10",
    "growth.graft_delay=4",
    "growth.evaluation_steps=10",
    "growth.cooldown_steps=20",
    "growth.max_parameter_ratio=5",
    "growth.max_seeds=3",
    "urza.worker=thread",  # ready within a second; the worker process is the smoke test's
]


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def test_a_static_run_leaves_metrics_checkpoints_and_a_report(tmp_path: Path) -> None:
    config = load_config(
        overrides=["growth.enabled=false", "train.epochs=2", f"run.dir={tmp_path}", "run.id=s"]
    )

    result = train(config, command="test")

    folder = tmp_path / "s"
    steps = list(read_metrics(folder / "metrics.jsonl", "step"))
    epochs = list(read_metrics(folder / "metrics.jsonl", "epoch"))
    info = json.loads((folder / "run.json").read_text())
    steps_per_epoch = -(-(1438 - int(1438 * 0.1)) // 64)  # digits train split minus validation
    assert result.status == "completed" and result.step == 2 * steps_per_epoch
    assert [r["step"] for r in steps] == list(range(1, 2 * steps_per_epoch + 1))
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in steps)
    assert sum(r["accuracy"] for r in steps[-5:]) > sum(r["accuracy"] for r in steps[:5])
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert epochs[-1]["test_score"] == result.test_score == info["test_score"]
    assert info["status"] == "completed" and info["command"] == "test"
    assert [p.name for p in sorted((folder / "checkpoints").iterdir())] == [
        "epoch-0001",
        "epoch-0002",
    ]
    assert (folder / "report.md").is_file()
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in (folder / "plots").glob("*.png"))
    assert len(list((folder / "plots").glob("*.png"))) == 4
    assert load_config(folder / "config.yaml") == config


def test_growth_grafts_each_kernel_exactly_graft_delay_steps_after_its_decision(
    tmp_path: Path,
) -> None:
    config = load_config(overrides=[*GROWTH, "train.epochs=4", f"run.dir={tmp_path}", "run.id=g"])

    result = train(config)

    path = tmp_path / "g" / "metrics.jsonl"
    decisions = list(read_metrics(path, "decision"))
    grafts = list(read_metrics(path, "graft"))
    steps = {r["step"]: r for r in read_metrics(path, "step")}
    assert decisions, "the bottleneck policy should germinate on this linear host"
    assert [d["step"] for d in decisions][:1] == [10]
    assert {(g["layer"], g["step"]) for g in grafts} == {
        (d["layer"], d["step"] + 4) for d in decisions
    }
    for graft in grafts:  # the parameter count grows by the kernel's size at the graft step
        before, after = steps[graft["step"] - 1]["parameters"], steps[graft["step"]]["parameters"]
        assert after - before == graft["kernel_parameters"] > 0
    kept = sum(p.numel() for p in result.model.kernel_parameters())
    culled = {c["decision_id"] for c in read_metrics(path, "cull")}
    assert kept == sum(
        g["kernel_parameters"]
        for g, d in zip(grafts, decisions, strict=True)
        if d["decision_id"] not in culled
    )
    assert result.parameters == 64 * 16 + 16 + 16 * 10 + 10 + kept


def test_resuming_a_folder_that_is_not_a_run_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="is not a run folder"):
        train(load_config(overrides=[f"run.dir={tmp_path}"]), resume=tmp_path)


def test_an_existing_run_id_is_not_overwritten(tmp_path: Path) -> None:
    config = load_config(
        overrides=["growth.enabled=false", "train.epochs=1", f"run.dir={tmp_path}", "run.id=x"]
    )
    train(config)

    with pytest.raises(ConfigurationError, match="exists already; resume it"):
        train(config)
