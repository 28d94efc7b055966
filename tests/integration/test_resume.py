"""Exact resume: a run interrupted after an epoch (or killed mid-epoch) and resumed with
``esper train --resume`` ends bit for bit where the uninterrupted run ends.

The runs grow: decisions every 10 steps from step 10, grafts 4 steps later, so the interruption
falls between a decision and its graft, while a kernel is blending and while one is evaluated.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
GROWTH = [
    "train.epochs=5",
    "growth.start_step=10",
    "growth.decide_every=10",
    "growth.graft_delay=4",
    "growth.evaluation_steps=10",
    "growth.cooldown_steps=20",
    "growth.max_parameter_fraction=5",
    "growth.max_adaptations=4",
    "seeds.blend_steps=8",
    "urza.worker=thread",  # one process per run: the test is about exactness, not the worker
]
TIMING = {"step_time_ms", "wall_s", "decision_id", "compiling"}
"""Fields that measure time (or are random ids), not what the run computed."""


def _train(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.Popen(
        [sys.executable, "-m", "esper.cli", "train", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(process: subprocess.Popen[str]) -> str:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    return output


def _start(root: Path, run_id: str, *extra: str) -> subprocess.Popen[str]:
    config = str(ROOT / "configs" / "digits.yaml")
    return _train(
        "--config", config, *GROWTH, f"run.dir={root}", f"run.id={run_id}", *extra, cwd=root
    )


def _records(folder: Path) -> list[dict[str, Any]]:
    records = []
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = {k: v for k, v in json.loads(line).items() if k not in TIMING}
        if record["type"] == "reward":  # compute_cost (and so the total) measures step time
            record.pop("total")
            record["components"].pop("compute_cost", None)
        records.append(record)
    return records


def _final_tensors(folder: Path) -> dict[str, Any]:
    return torch.load(folder / "checkpoints" / "epoch-0005" / "tensors.pt", weights_only=True)


def _assert_identical(expected: Path, actual: Path) -> None:
    a, b = _final_tensors(expected), _final_tensors(actual)
    assert a["model"].keys() == b["model"].keys()
    assert any(".seeds." in key for key in a["model"]), "the run should have grown"
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for index, state in a["optimizer"]["state"].items():
        other = b["optimizer"]["state"][index]
        assert all(torch.equal(state[k], other[k]) for k in state), index
    # torch's global RNG is not compared: the background compile and kernel-cache threads draw
    # from it (default init of the module a blueprint builds) at timing-dependent moments. The
    # training thread does not use it here (no dropout); the data order has its own generator.
    assert torch.equal(a["data_rng"], b["data_rng"])
    assert _records(expected) == _records(actual)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    _finish(_start(root, "full"))
    return root / "full"


def test_a_run_stopped_after_an_epoch_resumes_exactly(uninterrupted: Path) -> None:
    root = uninterrupted.parent
    output = _finish(_start(root, "stopped", "--stop-after-epoch", "2"))
    assert "interrupted at epoch 2" in output
    checkpoint = json.loads(
        (root / "stopped" / "checkpoints" / "epoch-0002" / "state.json").read_text()
    )
    in_flight = checkpoint["growth"]["executor"]["records"]
    assert in_flight, "the interruption should catch growth in flight"

    output = _finish(_train("--resume", str(root / "stopped"), cwd=root))

    assert "completed at epoch 5" in output
    _assert_identical(uninterrupted, root / "stopped")


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_exactly_from_its_last_checkpoint(
    uninterrupted: Path,
) -> None:
    root = uninterrupted.parent
    process = _start(root, "killed")
    marker = root / "killed" / "checkpoints" / "epoch-0002" / "state.json"
    deadline = time.monotonic() + 240
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    info = json.loads((root / "killed" / "run.json").read_text())
    assert info["status"] == "running"  # killed: nothing got to say otherwise

    _finish(_train("--resume", str(root / "killed"), cwd=root))

    _assert_identical(uninterrupted, root / "killed")


@pytest.mark.slow
def test_a_run_grown_by_the_shipped_gnn_policy_resumes_exactly(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    root = tmp_path_factory.mktemp("resume-gnn")
    _finish(_start(root, "full", "growth.policy=pretrained"))
    _finish(_start(root, "stopped", "growth.policy=pretrained", "--stop-after-epoch", "3"))

    _finish(_train("--resume", str(root / "stopped"), cwd=root))

    decisions = [r for r in _records(root / "full") if r["type"] == "decision"]
    assert decisions and {d["policy"] for d in decisions} == {"gnn"}
    _assert_identical(root / "full", root / "stopped")


# -- Ctrl-C (issue 9, item 16): one line, never a traceback, and a run that resumes -------------


def _wait_for(path: Path, process: subprocess.Popen[str], *, contains: str = "") -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and contains in path.read_text(errors="replace"):
            return
        time.sleep(0.005)
    raise AssertionError(f"{path} never appeared (exit status {process.poll()})")


def test_ctrl_c_mid_run_prints_one_line_and_the_run_resumes_exactly(uninterrupted: Path) -> None:
    root = uninterrupted.parent
    process = _start(root, "ctrl-c")
    _wait_for(root / "ctrl-c" / "checkpoints" / "epoch-0002" / "state.json", process)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)

    assert process.returncode == 130, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    last = output.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"stopped at epoch [2-4], step \d+; resume with: esper train --resume {root / 'ctrl-c'}",
        last,
    ), last
    info = json.loads((root / "ctrl-c" / "run.json").read_text())
    assert info["status"] == "interrupted"

    _finish(_train("--resume", str(root / "ctrl-c"), cwd=root))

    _assert_identical(uninterrupted, root / "ctrl-c")


def test_ctrl_c_during_the_warm_up_leaves_a_marked_run_that_resumes(tmp_path: Path) -> None:
    # no compile worker: the warm-up waits (up to 300 s) for compiles, so Ctrl-C surely lands there
    process = _start(tmp_path, "warm", "train.epochs=1", "urza.worker=none")
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:  # the warm-up says what it waits for before step 1
        lines.append(line)
        if line.startswith("warm-up: compiling"):
            break
    process.send_signal(signal.SIGINT)
    output = "".join(lines) + process.stdout.read()
    process.wait(timeout=120)

    assert process.returncode == 130, output
    assert re.search(r"^warm-up: compiling \d+ catalog kernels… 0/\d+ done$", output, re.M), output
    assert "Traceback" not in output
    assert output.strip().splitlines()[-1] == (
        "stopped before training started (during the warm-up); resume with: "
        f"esper train --resume {tmp_path / 'warm'}"
    )
    info = json.loads((tmp_path / "warm" / "run.json").read_text())
    assert info["status"] == "interrupted" and info["epoch"] == 0

    output = _finish(_train("--resume", str(tmp_path / "warm"), "urza.worker=thread", cwd=tmp_path))

    assert "completed at epoch 1" in output
    info = json.loads((tmp_path / "warm" / "run.json").read_text())
    assert info["status"] == "completed" and info["command"].startswith("esper train --config")
