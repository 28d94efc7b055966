"""DEEPEN under DDP: two gloo ranks insert a block at the same step, rebuild the DDP wrapper,
fossilize it, and end bit-identical (``tests/integration/deepen_lockstep_worker.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from servers import free_port

WORKER = Path(__file__).with_name("deepen_lockstep_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("init", ["fresh", "copy"])
def test_two_ranks_deepen_in_lockstep_and_stay_identical(tmp_path: Path, init: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    command += [f"--master_port={free_port()}", str(WORKER), "--out", str(tmp_path), "--init", init]
    tests = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for result in ranks:
        assert result["identical"] is True
        assert result["rebuilt_at"] == [3]  # the insertion; the ramp and the fossilize: no rebuild
        assert result["states"] == ["FOSSILIZED"]
        assert result["groups"] == 2
    assert ranks[0]["checksums"] == ranks[1]["checksums"]
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank trained on its own half
