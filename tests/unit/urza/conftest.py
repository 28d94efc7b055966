"""Fixtures for Urza's unit tests: an embedded library (SQLite + folder) and kernels to store."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from esper.contracts import BlueprintSpec, KernelMetadata, KernelTarget, LayerKind
from esper.urza import open_storage_library
from esper.urza.storage_library import StorageLibrary

KernelFactory = Callable[..., tuple[bytes, KernelMetadata]]


class FakeClock:
    """A clock the test moves by hand, so leases expire without sleeping."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _linear_target(
    in_features: int = 16, out_features: int = 8, device: str = "cpu"
) -> KernelTarget:
    return KernelTarget(
        layer_kind=LayerKind.LINEAR,
        in_features=in_features,
        out_features=out_features,
        channel_dim=-1,
        spatial_dims=0,
        device=device,
    )


@pytest.fixture
def linear_target() -> Callable[..., KernelTarget]:
    """Build a Linear-layer target: ``linear_target(in_features, out_features, device)``."""
    return _linear_target


@pytest.fixture
def spec() -> BlueprintSpec:
    return BlueprintSpec(family="residual_mlp", params={"hidden": 32})


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


@pytest.fixture
def make_kernel(spec: BlueprintSpec) -> KernelFactory:
    """Build (artifact bytes, metadata) pairs: well-formed artifacts of ``size`` bytes with
    random weights, whose metadata describes them."""

    def build(
        size: int = 4096,
        *,
        blueprint: BlueprintSpec | None = None,
        target: KernelTarget | None = None,
        dtype: str = "float32",
    ) -> tuple[bytes, KernelMetadata]:
        target = (target or _linear_target()).model_copy(update={"dtype": dtype})
        return sized_artifact(size, blueprint=blueprint or spec, target=target)

    return build


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def library(tmp_path: Path, clock: FakeClock) -> Iterator[StorageLibrary]:
    """An embedded library in ``tmp_path`` whose clock the test controls."""
    opened = open_storage_library(run_dir=tmp_path)
    assert isinstance(opened, StorageLibrary)
    lib = StorageLibrary(metadata=opened.metadata, blobs=opened.blobs, clock=clock)
    yield lib
    lib.close()
