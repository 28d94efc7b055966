"""Tolaria: the training orchestrator: the run loop that ties Kasmina, Urza, Oona and Tamiyo together.

``esper train --config configs/digits.yaml`` runs :func:`train` on a :class:`RunConfig` read by
:func:`load_config`; ``esper report`` is :func:`write_report` and ``esper runs`` is
:func:`list_runs`. The names are imported on first use, so ``import esper.tasks.datasets`` stays
light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from esper.tolaria.config import RunConfig, load_config
    from esper.tolaria.report import summarize, write_report
    from esper.tolaria.run_folder import RunFolder, list_runs
    from esper.tolaria.trainer import RunResult, train

__all__ = [
    "RunConfig",
    "RunFolder",
    "RunResult",
    "list_runs",
    "load_config",
    "summarize",
    "train",
    "write_report",
]

_HOMES = {
    "RunConfig": "esper.tolaria.config",
    "load_config": "esper.tolaria.config",
    "RunFolder": "esper.tolaria.run_folder",
    "list_runs": "esper.tolaria.run_folder",
    "summarize": "esper.tolaria.report",
    "write_report": "esper.tolaria.report",
    "RunResult": "esper.tolaria.trainer",
    "train": "esper.tolaria.trainer",
}


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use."""
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
