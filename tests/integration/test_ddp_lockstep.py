"""DDP lockstep growth: two gloo ranks graft at the same step and stay identical.

Launches ``tests/integration/lockstep_worker.py`` under ``torchrun`` with 2 ranks (one of them
loading kernels from a slow source), then the same worker alone on the whole batch, grafting at
the step the ranks agreed on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from servers import free_port

WORKER = Path(__file__).with_name("lockstep_worker.py")


def _run(args: list[str]) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


@pytest.mark.slow
def test_two_ranks_grow_in_lockstep_and_match_a_single_process(tmp_path: Path) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    launcher += [f"--master_port={free_port()}", str(WORKER)]
    _run([*launcher, "--out", str(tmp_path / "ddp")])

    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    weights = [load_file(tmp_path / "ddp" / f"rank{r}.safetensors") for r in (0, 1)]
    graft_step = ranks[0]["graft_step"]
    assert graft_step is not None and graft_step > 5  # grafted after the decision, not blocking
    assert ranks[0]["graft_step"] == ranks[1]["graft_step"]
    assert ranks[0]["states"] == ranks[1]["states"] == ["ACTIVE", "DORMANT", "DORMANT", "DORMANT"]
    assert ranks[0]["alphas"] == ranks[1]["alphas"]
    assert ranks[0]["param_groups"] == ranks[1]["param_groups"] == 2
    assert ranks[0]["telemetry"] == ranks[1]["telemetry"]  # averaged across ranks: identical
    assert weights[0].keys() == weights[1].keys()
    assert any(".seeds.0.kernel." in name for name in weights[0])
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name

    _run(
        [
            sys.executable,
            str(WORKER),
            "--out",
            str(tmp_path / "single"),
            "--graft-at",
            str(graft_step),
        ]
    )
    single = json.loads((tmp_path / "single" / "rank0.json").read_text())
    assert single["graft_step"] == graft_step
    torch.testing.assert_close(
        torch.tensor(ranks[0]["losses"]), torch.tensor(single["losses"]), rtol=1e-4, atol=1e-5
    )
    single_weights = load_file(tmp_path / "single" / "rank0.safetensors")
    for name, tensor in weights[0].items():
        torch.testing.assert_close(
            tensor.float(), single_weights[name].float(), rtol=1e-4, atol=1e-5
        )
