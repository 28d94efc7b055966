"""Core: ``esper.wrap`` / ``esper.unwrap`` and the MorphableModel they produce."""

from esper.core.frozen_graft import FrozenGraft
from esper.core.model_wrapper import MorphableModel, TelemetrySink, unwrap, wrap

__all__ = ["FrozenGraft", "MorphableModel", "TelemetrySink", "unwrap", "wrap"]
