"""Policy loading: a baseline by name, a trained GNN policy by path, a clear error otherwise; the
GNN policy (torch_geometric) is imported only when a path is loaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from esper.errors import ConfigurationError
from esper.tamiyo import BASELINE_NAMES
from esper.tamiyo.policy_loading import load_policy


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_a_baseline_loads_by_name(name: str) -> None:
    assert load_policy(name, seed=3).name == name


def test_an_unknown_policy_names_the_baselines_and_the_path_form() -> None:
    with pytest.raises(ConfigurationError, match="bottleneck") as raised:
        load_policy("/no/such/policy")
    assert "trained policy file" in str(raised.value)


def test_a_saved_gnn_policy_loads_by_path_with_its_weights(tmp_path: Path) -> None:
    from esper.tamiyo.policy import GNNPolicy

    saved = GNNPolicy(sample_seed=0)
    path = saved.save(tmp_path / "policy.safetensors")

    loaded = load_policy(str(path), seed=1)

    assert isinstance(loaded, GNNPolicy) and loaded.name == "gnn"
    assert loaded.to_bytes() == saved.to_bytes()


def test_importing_tamiyo_and_the_executor_does_not_import_optional_backends() -> None:
    probe = (
        "import sys, esper.tamiyo, esper.tolaria.growth_executor; "
        "print(sorted(m for m in ('torch_geometric', 'redis', 'sqlalchemy', 'httpx') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
