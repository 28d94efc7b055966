"""Telemetry contracts: health signals per layer and per seed, and model/cache statistics.

Finiteness: the statistics of a health signal are *measurements* of the model (output mean and
spread, gradient norm, a seed's alpha and contribution). A host or kernel that diverged really
produces NaN or infinite values there, and the execution layer reports them as they are, so those
fields accept non-finite values and every consumer must cope (Tamiyo's health collector skips
them and flags the layer anomalous). Values Esper computes itself (timestamps, latencies) are
never legitimately non-finite and are refused here.
"""

from __future__ import annotations

from pydantic import Field, FiniteFloat

from esper.contracts.base import Contract
from esper.contracts.kernels import KernelId, LayerKindName
from esper.contracts.lifecycle import SeedState


class SeedHealth(Contract):
    """Health of one seed over a telemetry window."""

    seed_idx: int = Field(ge=0)
    state: SeedState
    alpha: float = Field(description="blend weight, as read from the seed (not finite: corrupted)")
    kernel_id: KernelId | None = None
    contribution_rms: float = Field(
        ge=0,
        description="root-mean-square of alpha * kernel output over the recorded forwards "
        "(infinite when it overflowed)",
    )
    nonfinite_output: bool = Field(
        description="whether any kernel output in the window was NaN or infinite (then quarantined)"
    )
    error_count: int = Field(ge=0)


class HealthSignal(Contract):
    """Health of one wrapped layer over a telemetry window (``samples`` recorded forwards)."""

    layer_name: str
    layer_kind: LayerKindName
    step: int = Field(ge=0)
    timestamp: FiniteFloat
    samples: int = Field(ge=0, description="forwards whose statistics were recorded")
    output_mean: float = Field(description="mean of the layer's output (NaN/inf: it diverged)")
    output_std: float = Field(ge=0, description="standard deviation of the output (inf: overflow)")
    dead_fraction: float = Field(ge=0, le=1, description="units never positive in a recorded batch")
    grad_norm: float | None = Field(
        default=None, description="L2 norm of the base layer's grads (NaN/inf: they diverged)"
    )
    seeds: tuple[SeedHealth, ...]


class LayerStats(Contract):
    """Structure and seed states of one wrapped layer."""

    layer_name: str
    layer_kind: LayerKindName
    base_parameters: int
    kernel_parameters: int
    seeds_by_state: dict[SeedState, int]
    kernel_ids: tuple[KernelId | None, ...]


class CacheStats(Contract):
    """Counters of a kernel cache since it was created."""

    entries: int
    bytes: int
    max_entries: int
    max_bytes: int
    pinned: int
    hits: int
    misses: int
    coalesced: int = Field(description="requests that joined a load already in flight")
    evictions: int
    load_failures: int
    load_latency_ms_mean: FiniteFloat | None = None
    load_latency_ms_p50: FiniteFloat | None = None
    load_latency_ms_p99: FiniteFloat | None = None

    @property
    def hit_rate(self) -> float:
        """Fraction of requests served from the cache (0 when nothing was requested)."""
        requests = self.hits + self.misses + self.coalesced
        return self.hits / requests if requests else 0.0


class ModelStats(Contract):
    """Structure, parameter counts and seed states of a morphable model."""

    layers: tuple[LayerStats, ...]
    base_parameters: int
    kernel_parameters: int
    seeds_by_state: dict[SeedState, int]
    cache: CacheStats | None = None

    @property
    def total_parameters(self) -> int:
        """Base plus grafted kernel parameters."""
        return self.base_parameters + self.kernel_parameters
