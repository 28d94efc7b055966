"""``benchmarks/gpu_check.py --device cpu --quick`` runs green in CI (issue 13): every section
prints its rows, the host-sync section finds no host read by Esper's code in the step path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_gpu_check_cpu_quick_mode_prints_every_section_and_passes() -> None:
    done = subprocess.run(
        [sys.executable, "gpu_check.py", "--device", "cpu", "--quick", "--trials", "3"],
        cwd=BENCHMARKS,
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    for section in ("## ratios", "## graft latency", "## step time during a compile"):
        assert section in done.stdout
    assert "no host read" in done.stdout
    assert "esper train digits MLP (cpu)" in done.stdout and "status completed" in done.stdout
    assert "FAILED" not in done.stdout
