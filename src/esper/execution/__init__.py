"""Kasmina: the execution layer: seeds inside wrapped layers, their state layout, the kernel cache."""

from esper.execution.arguments import MAX_SEEDS_PER_LAYER
from esper.execution.artifact_sources import (
    ArtifactSource,
    DirectoryArtifactSource,
    InMemoryArtifactSource,
)
from esper.execution.kasmina_layer import KasminaLayer
from esper.execution.kernel_cache import CachedKernel, KernelCache
from esper.execution.layer_kinds import SUPPORTED_LAYER_TYPES, GraftPoint, LayerProfile
from esper.execution.seed_lifecycle import SeedEvents
from esper.execution.state_layout import KasminaStateLayout, SeedLifecycleState, SeedStateLayout

__all__ = [
    "MAX_SEEDS_PER_LAYER",
    "SUPPORTED_LAYER_TYPES",
    "ArtifactSource",
    "CachedKernel",
    "DirectoryArtifactSource",
    "GraftPoint",
    "InMemoryArtifactSource",
    "KasminaLayer",
    "KasminaStateLayout",
    "KernelCache",
    "LayerProfile",
    "SeedEvents",
    "SeedLifecycleState",
    "SeedStateLayout",
]
