"""UrzaArtifactSource: the kernel cache loads real artifacts from the library through it."""

from __future__ import annotations

import pytest

from esper.blueprints import create_artifact
from esper.contracts import BlueprintSpec
from esper.errors import KernelLoadError, KernelNotFoundError
from esper.execution import KernelCache
from esper.urza import UrzaArtifactSource
from esper.urza.storage_library import StorageLibrary


def test_fetch_returns_stored_bytes_and_raises_for_unknown_ids(
    library: StorageLibrary, make_kernel
) -> None:
    artifact, metadata = make_kernel(3000)
    library.put_kernel(artifact, metadata)
    source = UrzaArtifactSource(library)

    assert source.fetch(metadata.kernel_id) == artifact
    with pytest.raises(KernelNotFoundError):
        source.fetch("9" * 64)


def test_kernel_cache_loads_a_compiled_kernel_from_the_library(
    library: StorageLibrary, linear_target
) -> None:
    spec = BlueprintSpec(family="residual_mlp", params={"hidden": 8})
    artifact, metadata = create_artifact(spec, linear_target(16, 16))
    library.put_kernel(artifact, metadata)
    cache = KernelCache(UrzaArtifactSource(library))
    try:
        entry = cache.get(metadata.kernel_id).result(timeout=60)
        missing = cache.get("9" * 64)
        with pytest.raises((KernelNotFoundError, KernelLoadError)):
            missing.result(timeout=60)
    finally:
        cache.close()

    assert entry.metadata == metadata
    assert entry.nbytes > 0
