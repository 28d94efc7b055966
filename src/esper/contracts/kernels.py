"""Kernel contracts: what a kernel is built from (blueprint), for (target), and what it is (metadata)."""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from typing import Annotated

from pydantic import Field, field_validator

from esper.contracts.base import Contract
from esper.contracts.bounds import (
    MAX_ARTIFACT_BYTES,
    MAX_BLUEPRINT_PARAMS,
    Count,
    DeviceName,
    DtypeName,
    Features,
    InitSeed,
    ParameterCount,
    ParamName,
    ParamValue,
    Text,
)

SHA256_HEX_PATTERN = r"^[0-9a-f]{64}$"
"""A lowercase sha256 hex digest: the form of every content-addressed id in Esper."""

KernelId = Annotated[str, Field(pattern=SHA256_HEX_PATTERN)]
"""Content address of a kernel artifact: the sha256 hex digest of its bytes."""


LayerKindName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
"""A layer kind's name: one of :class:`LayerKind` or a kind a user registered
(``esper.register_layer_kind``)."""


class LayerKind(StrEnum):
    """The built-in kinds of host layer a seed can be attached to (users may register more)."""

    LINEAR = "linear"
    CONV1D = "conv1d"
    CONV2D = "conv2d"
    LAYER_NORM = "layer_norm"
    BATCH_NORM1D = "batch_norm1d"
    BATCH_NORM2D = "batch_norm2d"
    MULTIHEAD_ATTENTION = "multihead_attention"
    HF_CONV1D = "hf_conv1d"
    RMS_NORM = "rms_norm"
    EMBEDDING = "embedding"


class KernelTarget(Contract):
    """The host-layer geometry a kernel is built for.

    A kernel reads a tensor whose channel dimension (``channel_dim``) has ``in_features`` entries
    and writes a tensor of the host layer's output shape, whose channel dimension has
    ``out_features`` entries; ``spatial_dims`` trailing dimensions (0 for feature vectors and
    sequences, 1 for Conv1d/BatchNorm1d-on-sequences, 2 for images) follow the channel dimension
    when ``channel_dim`` is 1.
    """

    layer_kind: LayerKindName
    in_features: Features
    out_features: Features
    channel_dim: int = Field(description="-1: features last (Linear, LayerNorm); 1: channels first")
    spatial_dims: int = Field(ge=0, le=2)
    dtype: DtypeName = "float32"
    device: DeviceName = "cpu"

    @field_validator("channel_dim")
    @classmethod
    def _channel_dim_is_first_or_last(cls, value: int) -> int:
        if value not in (-1, 1):
            raise ValueError(
                f"channel_dim must be -1 (features last) or 1 (channels first), got {value}"
            )
        return value

    def same_geometry(self, other: KernelTarget) -> bool:
        """Whether a kernel built for ``other`` fits a seed built for ``self`` (dtype/device aside)."""
        return (
            self.in_features,
            self.out_features,
            self.channel_dim,
            self.spatial_dims,
        ) == (other.in_features, other.out_features, other.channel_dim, other.spatial_dims)

    def describe(self) -> str:
        """A short human-readable form, e.g. ``linear 64->16``."""
        spatial = f" ({self.spatial_dims}d spatial)" if self.spatial_dims else ""
        return f"{self.layer_kind} {self.in_features}->{self.out_features}{spatial}"


class BlueprintSpec(Contract):
    """A declarative kernel design: a built-in family name plus its hyperparameters.

    Blueprints are data, never code: a builder that ships with Esper interprets them.
    """

    family: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    params: dict[ParamName, ParamValue] = Field(
        default_factory=dict, max_length=MAX_BLUEPRINT_PARAMS
    )

    def canonical_json(self) -> str:
        """The spec as compact JSON with sorted keys: the same spec always gives the same text."""
        return json.dumps(
            {"family": self.family, "params": self.params}, sort_keys=True, separators=(",", ":")
        )

    @property
    def blueprint_id(self) -> str:
        """Content address of the spec: sha256 of its canonical JSON."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


class KernelCharacterization(Contract):
    """What compiling a kernel measured about it on its target device (not part of its bytes)."""

    device: DeviceName
    latency_us_median: float = Field(ge=0, allow_inf_nan=False)
    flops_per_sample: Count
    batch_sizes_validated: tuple[Annotated[int, Field(gt=0, le=2**20)], ...] = Field(max_length=32)
    exportable: bool
    export_error: Text | None = None


class KernelMetadata(Contract):
    """Everything known about one kernel artifact.

    ``kernel_id`` is the sha256 of the artifact's bytes (its content address) and ``checksum`` the
    sha256 of its weights payload; both are re-derived and checked whenever the artifact is loaded.
    """

    kernel_id: KernelId
    blueprint: BlueprintSpec
    target: KernelTarget
    dtype: DtypeName
    parameter_count: ParameterCount
    size_bytes: int = Field(gt=0, le=MAX_ARTIFACT_BYTES)
    checksum: KernelId
    init_seed: InitSeed
    characterization: KernelCharacterization | None = None
