"""Fixtures for Urza's unit tests: an embedded library (SQLite + folder) and kernels to store."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import factories
from esper.contracts import BlueprintSpec, KernelMetadata, KernelTarget
from esper.urza import open_storage_library
from esper.urza.storage_library import StorageLibrary

KernelFactory = Callable[..., tuple[bytes, KernelMetadata]]


@pytest.fixture
def linear_target() -> Callable[..., KernelTarget]:
    """Build a Linear-layer target: ``linear_target(in_features, out_features, device)``."""
    return factories.linear_target


@pytest.fixture
def spec() -> BlueprintSpec:
    return BlueprintSpec(family="residual_mlp", params={"hidden": 32})


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
        target = (target or factories.linear_target()).model_copy(update={"dtype": dtype})
        return factories.sized_artifact(size, blueprint=blueprint or spec, target=target)

    return build


@pytest.fixture
def clock() -> factories.FakeClock:
    return factories.FakeClock()


@pytest.fixture
def library(tmp_path: Path, clock: factories.FakeClock) -> Iterator[StorageLibrary]:
    """An embedded library in ``tmp_path`` whose clock the test controls."""
    opened = open_storage_library(run_dir=tmp_path)
    assert isinstance(opened, StorageLibrary)
    lib = StorageLibrary(metadata=opened.metadata, blobs=opened.blobs, clock=clock)
    yield lib
    lib.close()
