"""DDP lockstep widen: two gloo ranks widen and fossilize at the same step and stay identical."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from servers import free_port

WORKER = Path(__file__).with_name("widen_ddp_worker.py")


@pytest.mark.slow
def test_two_ranks_widen_in_lockstep_and_stay_bit_identical(tmp_path: Path) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    launcher += [f"--master_port={free_port()}", str(WORKER), "--out", str(tmp_path)]
    done = subprocess.run(launcher, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    weights = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    for report in ranks:
        assert report["identical"] == {"after_widen": True, "after_fossilize": True, "end": True}
        assert report["widths"] == [12, 12]
        assert report["param_groups"] == 1  # the units' group left with the merge
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    assert weights[0]["model.0.base.weight"].shape == (12, 6)
