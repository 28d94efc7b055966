"""Fixtures for Urza's unit tests: an embedded library (SQLite + folder) and kernels to store."""

from __future__ import annotations

import hashlib
import os
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


@pytest.fixture
def make_kernel(spec: BlueprintSpec) -> KernelFactory:
    """Build (artifact bytes, metadata) pairs whose id and size match the bytes."""

    def build(
        size: int = 4096,
        *,
        blueprint: BlueprintSpec | None = None,
        target: KernelTarget | None = None,
        dtype: str = "float32",
    ) -> tuple[bytes, KernelMetadata]:
        artifact = os.urandom(size)
        metadata = KernelMetadata(
            kernel_id=hashlib.sha256(artifact).hexdigest(),
            blueprint=blueprint or spec,
            target=target or _linear_target(),
            dtype=dtype,
            parameter_count=size // 4,
            size_bytes=size,
            checksum=hashlib.sha256(artifact[8:]).hexdigest(),
            init_seed=0,
        )
        return artifact, metadata

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
