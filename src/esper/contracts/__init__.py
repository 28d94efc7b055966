"""Contracts: the Pydantic models that cross a component boundary (frozen, strict, versioned)."""

from esper.contracts.base import SCHEMA_VERSION, Contract
from esper.contracts.control import (
    OPERATOR_INITS,
    AdaptationAction,
    AdaptationDecision,
    DecisionRefusal,
    GrowthOperator,
    RewardReport,
)
from esper.contracts.kernel_aliases import AliasName, KernelAlias
from esper.contracts.kernels import (
    BlueprintSpec,
    KernelCharacterization,
    KernelId,
    KernelMetadata,
    KernelTarget,
    LayerKind,
    LayerKindName,
)
from esper.contracts.library import (
    BlueprintRecord,
    BlueprintStatus,
    CompileJob,
    CompileJobStatus,
    LibraryStats,
)
from esper.contracts.lifecycle import (
    TRANSITIONS,
    SeedState,
    check_transition,
    is_legal_transition,
)
from esper.contracts.messages import (
    Envelope,
    HealthSignalBatch,
    KernelFailed,
    KernelReady,
    Topic,
)
from esper.contracts.telemetry import (
    CacheStats,
    HealthSignal,
    LayerStats,
    ModelStats,
    SeedHealth,
)
from esper.contracts.topology import LayerTopology, ModelTopology, TrainingProgress

__all__ = [
    "OPERATOR_INITS",
    "SCHEMA_VERSION",
    "TRANSITIONS",
    "AdaptationAction",
    "AdaptationDecision",
    "AliasName",
    "BlueprintRecord",
    "BlueprintSpec",
    "BlueprintStatus",
    "CacheStats",
    "CompileJob",
    "CompileJobStatus",
    "Contract",
    "DecisionRefusal",
    "Envelope",
    "GrowthOperator",
    "HealthSignal",
    "HealthSignalBatch",
    "KernelAlias",
    "KernelCharacterization",
    "KernelFailed",
    "KernelId",
    "KernelMetadata",
    "KernelReady",
    "KernelTarget",
    "LayerKind",
    "LayerKindName",
    "LayerStats",
    "LayerTopology",
    "LibraryStats",
    "ModelStats",
    "ModelTopology",
    "RewardReport",
    "SeedHealth",
    "SeedState",
    "Topic",
    "TrainingProgress",
    "check_transition",
    "is_legal_transition",
]
