"""Test factories: the targets, messages and clock that many tests build, with the usual values.

Each builder takes keyword overrides for what a test cares about and fills in the rest, so a test
names only what it varies::

    linear_target(16, 8)                      # a Linear layer's geometry
    germinate("fc1", step=10, seed_idx=1)     # a GERMINATE decision (residual_mlp, hidden 32)
    health_signal("fc2", grad_norm=3.0, seeds=dormant_seeds(2))
    clock = FakeClock(); clock.advance(11)    # leases expire without sleeping
    sized_artifact(4096, blueprint=MLP_H32, target=linear_target())   # (bytes, KernelMetadata)

Import them as ``from factories import …`` (``tests/`` is on the path).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from esper.contracts import (
    AdaptationAction,
    AdaptationDecision,
    BlueprintSpec,
    HealthSignal,
    KernelMetadata,
    KernelReady,
    KernelTarget,
    LayerKind,
    SeedHealth,
    SeedState,
)

if TYPE_CHECKING:
    from esper.urza import ArtifactLibrary
    from esper.urza.storage_library import StorageLibrary

MLP_H32 = BlueprintSpec(family="residual_mlp", params={"hidden": 32, "activation": "relu"})
"""The blueprint a germination names unless a test says otherwise: the catalog's ``mlp_h32``
(``esper.tamiyo.observation.BLUEPRINT_CATALOG``)."""


class FakeClock:
    """A clock the test moves by hand (``clock()`` is the time, ``clock.advance(s)`` moves it),
    for leases, timeouts and timestamps that must pass without sleeping."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the time forward by ``seconds``."""
        self.now += seconds


def on_clock(library: ArtifactLibrary, clock: Callable[[], float]) -> StorageLibrary:
    """A storage-backed ``library`` (as ``open_storage_library`` opens it) whose timestamps and
    job leases come from ``clock``: the same database and blob store, the test's time."""
    from esper.urza.storage_library import StorageLibrary

    assert isinstance(library, StorageLibrary), f"not a storage library: {library!r}"
    return StorageLibrary(metadata=library.metadata, blobs=library.blobs, clock=clock)


# -- kernel targets ------------------------------------------------------------------------------


def linear_target(
    in_features: int = 16, out_features: int = 8, *, device: str = "cpu", dtype: str = "float32"
) -> KernelTarget:
    """The geometry of a ``Linear(in_features, out_features)`` layer (features last)."""
    return KernelTarget(
        layer_kind=LayerKind.LINEAR,
        in_features=in_features,
        out_features=out_features,
        channel_dim=-1,
        spatial_dims=0,
        device=device,
        dtype=dtype,
    )


def conv2d_target(in_channels: int = 8, out_channels: int = 8) -> KernelTarget:
    """The geometry of a ``Conv2d(in_channels, out_channels, …)`` layer (channels first)."""
    return KernelTarget(
        layer_kind=LayerKind.CONV2D,
        in_features=in_channels,
        out_features=out_channels,
        channel_dim=1,
        spatial_dims=2,
    )


# -- decisions and kernel messages ---------------------------------------------------------------


def decision(
    layer_name: str = "fc",
    *,
    action: AdaptationAction = AdaptationAction.GERMINATE,
    step: int = 0,
    seed_idx: int = 0,
    blueprint: BlueprintSpec | None = MLP_H32,
    run_id: str = "run-1",
    policy: str = "test",
    **fields: Any,
) -> AdaptationDecision:
    """A decision as a policy that is sure of it sends it (confidence 1, no uncertainty); the
    blueprint is dropped for actions other than ``GERMINATE``."""
    return AdaptationDecision(
        run_id=run_id,
        step=step,
        action=action,
        layer_name=layer_name,
        seed_idx=seed_idx,
        blueprint=blueprint if action is AdaptationAction.GERMINATE else None,
        policy=policy,
        confidence=fields.pop("confidence", 1.0),
        uncertainty=fields.pop("uncertainty", 0.0),
        **fields,
    )


def germinate(layer_name: str = "fc", **fields: Any) -> AdaptationDecision:
    """A ``GERMINATE`` decision (see :func:`decision`)."""
    return decision(layer_name, action=AdaptationAction.GERMINATE, **fields)


def kernel_ready(index: int = 0, *, target: KernelTarget | None = None) -> KernelReady:
    """A ``kernel.ready`` announcement whose ids are derived from ``index``."""
    return KernelReady(
        kernel_id=f"{index:064x}",
        blueprint_id="b" * 64,
        target=target or linear_target(8, 4),
        job_id=f"{index:032x}",
    )


# -- health telemetry ----------------------------------------------------------------------------


def seed_health(
    seed_idx: int = 0, state: SeedState = SeedState.DORMANT, **fields: Any
) -> SeedHealth:
    """A seed's health over a window: no alpha, no contribution, no fault unless given."""
    values: dict[str, Any] = {
        "alpha": 0.0,
        "contribution_rms": 0.0,
        "nonfinite_output": False,
        "error_count": 0,
    }
    return SeedHealth(seed_idx=seed_idx, state=state, **(values | fields))


def dormant_seeds(count: int) -> tuple[SeedHealth, ...]:
    """``count`` dormant seeds, indexed from 0."""
    return tuple(seed_health(i) for i in range(count))


def seeds_in(states: Sequence[SeedState]) -> tuple[SeedHealth, ...]:
    """One seed per state, indexed from 0."""
    return tuple(seed_health(i, state) for i, state in enumerate(states))


def health_signal(layer_name: str = "fc1", **fields: Any) -> HealthSignal:
    """A Linear layer's health at step 10 over 4 samples: output mean 0, std 1, no dead units,
    gradient norm 1, no seeds, unless given."""
    values: dict[str, Any] = {
        "layer_kind": LayerKind.LINEAR,
        "step": 10,
        "timestamp": 0.0,
        "samples": 4,
        "output_mean": 0.0,
        "output_std": 1.0,
        "dead_fraction": 0.0,
        "grad_norm": 1.0,
        "seeds": (),
    }
    return HealthSignal(layer_name=layer_name, **(values | fields))


# -- kernel artifacts ----------------------------------------------------------------------------

_CODES = {
    "float32": ("F32", 4),
    "float64": ("F64", 8),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
}


def sized_artifact(
    size: int, *, blueprint: BlueprintSpec, target: KernelTarget, init_seed: int = 0
) -> tuple[bytes, KernelMetadata]:
    """A well-formed kernel artifact of exactly ``size`` bytes with random weights, and its
    metadata: the safetensors layout and ``esper.kernel`` header entry that
    ``esper.blueprints.encode_artifact`` writes, with one weight tensor sized to fill ``size``
    (the header is padded with spaces, as safetensors allows). The weights are not the
    blueprint's tensors: Urza reads headers, it never builds kernels."""
    code, itemsize = _CODES[target.dtype]
    entry = {
        "format": "esper.kernel",
        "format_version": 1,
        "blueprint": blueprint.model_dump(mode="json"),
        "target": target.model_dump(mode="json"),
        "init_seed": init_seed,
    }
    metadata_entry = {"esper.kernel": json.dumps(entry, sort_keys=True, separators=(",", ":"))}
    elements = (size - 8) // itemsize
    while elements >= 0:
        header = {
            "__metadata__": metadata_entry,
            "weight": {
                "dtype": code,
                "shape": [elements],
                "data_offsets": [0, elements * itemsize],
            },
        }
        text = json.dumps(header, separators=(",", ":")).encode()
        padding = size - 8 - len(text) - elements * itemsize
        if padding >= 0:
            break
        elements -= 1
    assert elements >= 0, f"{size} bytes cannot hold an artifact header"
    header_bytes = text + b" " * padding
    payload = os.urandom(elements * itemsize)
    artifact = struct.pack("<Q", len(header_bytes)) + header_bytes + payload
    metadata = KernelMetadata(
        kernel_id=hashlib.sha256(artifact).hexdigest(),
        blueprint=blueprint,
        target=target,
        dtype=target.dtype,
        parameter_count=elements,
        size_bytes=size,
        checksum=hashlib.sha256(payload).hexdigest(),
        init_seed=init_seed,
    )
    return artifact, metadata
