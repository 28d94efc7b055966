"""Importing esper imports no optional backend and never initialises CUDA (as torchao checks)."""

from __future__ import annotations

import json
import subprocess
import sys

OPTIONAL_BACKENDS = (
    "redis",
    "sqlalchemy",
    "psycopg",
    "boto3",
    "botocore",
    "fastapi",
    "uvicorn",
    "httpx",
    "torch_geometric",
    "transformers",
)

PROBE = f"""
import json, sys
import esper
import esper.blueprints, esper.contracts, esper.core, esper.execution
import torch
model = esper.wrap(torch.nn.Sequential(torch.nn.Linear(2, 2)))
model(torch.zeros(1, 2))
print(json.dumps({{
    "loaded": sorted(m for m in {list(OPTIONAL_BACKENDS)!r} if m in sys.modules),
    "cuda_initialized": torch.cuda.is_initialized(),
    "version": esper.__version__,
}}))
"""


def test_import_esper_is_lean() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=False
    )

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert report["cuda_initialized"] is False
    assert report["version"]
