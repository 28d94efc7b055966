"""The esper.tolaria package: its public names load on first use; the tasks never import it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import esper.tolaria

PROBE = """
import json, sys
import esper.tasks.datasets
print(json.dumps(sorted(m for m in sys.modules if m.startswith(("esper.tolaria", "esper.tamiyo", "esper.tasks")))))
"""


def test_public_names_come_from_their_modules() -> None:
    from esper.tolaria.config import load_config
    from esper.tolaria.trainer import train

    assert esper.tolaria.train is train
    assert esper.tolaria.load_config is load_config
    assert set(esper.tolaria.__all__) >= {"train", "load_config", "write_report", "list_runs"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = esper.tolaria.nope


def test_importing_the_datasets_imports_neither_tolaria_nor_tamiyo() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True
    )

    assert json.loads(result.stdout.strip().splitlines()[-1]) == [
        "esper.tasks",
        "esper.tasks.datasets",
    ]
