"""Esper: morphogenetic training for PyTorch: models that grow capacity where they need it.

Quick start::

    import esper
    model = esper.wrap(model, seeds_per_layer=4)         # dormant seeds: outputs unchanged
    await model.load_kernel("fc1", seed_idx=0, kernel_artifact_id="kernel-001")  # an alias
    output = model(inputs)                                # base + kernel (ACTIVE, alpha 1)

Kernels come from the user's default library (``ESPER_URZA_URL``, else the embedded one in
``ESPER_URZA_RUN_DIR``, default ``runs/urza``) unless ``wrap`` is given ``kernel_source=``.

Importing ``esper`` imports only pydantic: torch and safetensors load with the first use of
``wrap``, ``unwrap``, ``MorphableModel`` or ``KasminaLayer`` (so ``esper --help`` answers at once),
optional backends (SQL drivers, Redis, boto3, FastAPI, torch_geometric, transformers) load when the component
that needs them is used, and CUDA is never initialised by the import.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from esper.contracts import SeedState

if TYPE_CHECKING:
    from esper.core.model_wrapper import MorphableModel, unwrap, wrap
    from esper.execution import (
        KasminaLayer,
        KasminaStateLayout,
        LayerGeometry,
        register_layer_kind,
        registered_layer_kinds,
        unregister_layer_kind,
    )

__version__ = "0.1.0"

SeedLifecycleState = SeedState
"""The reference design's name of :class:`SeedState` (the same enum)."""

__all__ = [
    "KasminaLayer",
    "KasminaStateLayout",
    "LayerGeometry",
    "MorphableModel",
    "SeedLifecycleState",
    "SeedState",
    "__version__",
    "configure_logging",
    "register_layer_kind",
    "registered_layer_kinds",
    "unregister_layer_kind",
    "unwrap",
    "wrap",
]


def configure_logging(level: int | str = logging.INFO) -> None:
    """Send Esper's log records (logger ``"esper"``) to stderr at ``level``.

    Library code only logs; this is a convenience for scripts. Calling it again changes the level
    without adding a second handler.
    """
    logger = logging.getLogger("esper")
    logger.setLevel(level)
    if not any(getattr(h, "_esper_handler", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._esper_handler = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


_HOMES = {
    "MorphableModel": "esper.core",
    "unwrap": "esper.core",
    "wrap": "esper.core",
    "KasminaLayer": "esper.execution",
    "KasminaStateLayout": "esper.execution",
    "LayerGeometry": "esper.execution",
    "register_layer_kind": "esper.execution",
    "registered_layer_kinds": "esper.execution",
    "unregister_layer_kind": "esper.execution",
}


def __getattr__(name: str) -> Any:
    """Import a public name that needs torch from its module on first use."""
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
