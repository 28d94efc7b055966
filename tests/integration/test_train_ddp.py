"""``esper train --nproc 2``: the real entry point on two gloo ranks grows in lockstep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.slow
def test_esper_train_on_two_ranks_grows_identical_replicas(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "esper.cli", "train", "--config", str(CONFIGS / "digits.yaml")]
    command += ["--nproc", "2", "train.epochs=12", f"run.dir={tmp_path / 'runs'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    (folder,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("digits-")]
    info = json.loads((folder / "run.json").read_text())
    assert info["status"] == "completed"
    assert info["world_size"] == 2
    assert info["replicas_identical"] is True  # parameters, kernels, seed states: bit-identical
    counters = info["growth_counters"]
    assert counters["executor.germinated"] >= 1  # it grew, on both ranks at once
    assert info["parameters"] > info["initial_parameters"]
    assert (folder / "report.md").exists() and list((folder / "checkpoints").iterdir())
    scratch = Path(os.environ.get("TMPDIR", "/tmp")).glob(f"esper-rank-*/{folder.name}")
    assert not list(scratch)  # rank 1's scratch folder is gone
