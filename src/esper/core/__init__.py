"""Core: ``esper.wrap`` / ``esper.unwrap`` and the MorphableModel they produce."""

from esper.core.model_wrapper import MorphableModel, TelemetrySink, unwrap, wrap
from esper.core.optimizer_state import SEED_GROUP_KEY, load_optimizer_state_dict

__all__ = [
    "SEED_GROUP_KEY",
    "MorphableModel",
    "TelemetrySink",
    "load_optimizer_state_dict",
    "unwrap",
    "wrap",
]
