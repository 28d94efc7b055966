"""Kasmina: the execution layer: seeds inside wrapped layers, their state layout, the kernel cache."""

from esper.execution.arguments import MAX_SEEDS_PER_LAYER
from esper.execution.artifact_sources import (
    ArtifactSource,
    DirectoryArtifactSource,
    InMemoryArtifactSource,
)
from esper.execution.kasmina_layer import KasminaLayer
from esper.execution.kernel_cache import CachedKernel, KernelCache
from esper.execution.layer_kind_registry import (
    GraftPoint,
    LayerGeometry,
    LayerKindSpec,
    kind_of,
    register_layer_kind,
    registered_layer_kinds,
    unregister_layer_kind,
)
from esper.execution.layer_kinds import LayerProfile, profile_layer
from esper.execution.seed_lifecycle import SeedEvents
from esper.execution.state_layout import KasminaStateLayout, SeedLifecycleState, SeedStateLayout

__all__ = [
    "MAX_SEEDS_PER_LAYER",
    "ArtifactSource",
    "CachedKernel",
    "DirectoryArtifactSource",
    "GraftPoint",
    "InMemoryArtifactSource",
    "KasminaLayer",
    "KasminaStateLayout",
    "KernelCache",
    "LayerGeometry",
    "LayerKindSpec",
    "LayerProfile",
    "SeedEvents",
    "SeedLifecycleState",
    "SeedStateLayout",
    "kind_of",
    "profile_layer",
    "register_layer_kind",
    "registered_layer_kinds",
    "unregister_layer_kind",
]
