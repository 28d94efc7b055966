"""Artifact sources: in memory and a local folder; ids are validated content addresses."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper.blueprints import sha256_hex
from esper.errors import ConfigurationError, KernelNotFoundError
from esper.execution import DirectoryArtifactSource, InMemoryArtifactSource
from esper.execution.artifact_sources import check_kernel_id

DATA = b"artifact bytes for a test"


def test_in_memory_source_stores_under_the_sha256() -> None:
    source = InMemoryArtifactSource()

    kernel_id = source.add(DATA)

    assert kernel_id == sha256_hex(DATA)
    assert source.fetch(kernel_id) == DATA
    with pytest.raises(KernelNotFoundError):
        source.fetch("0" * 64)


def test_directory_source_round_trip_and_atomic_write(tmp_path: Path) -> None:
    source = DirectoryArtifactSource(tmp_path / "kernels")

    kernel_id = source.add(DATA)
    again = source.add(DATA)

    assert kernel_id == again == sha256_hex(DATA)
    assert source.fetch(kernel_id) == DATA
    assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == [f"{kernel_id}.safetensors"]
    with pytest.raises(KernelNotFoundError, match="0" * 64):
        source.fetch("0" * 64)


@pytest.mark.parametrize(
    "bad_id",
    [
        "",
        "../" + "0" * 61,
        "A" * 64,
        "0" * 63,
        "0" * 65,
        "g" * 64,
        None,
        12,
        "0" * 64 + "\n",
        "\n" + "0" * 64,
        "0" * 64 + "\x00",
        "0" * 64 + " ",
        b"0" * 64,
    ],
)
def test_invalid_ids_are_refused_before_touching_storage(tmp_path: Path, bad_id: object) -> None:
    source = DirectoryArtifactSource(tmp_path)

    with pytest.raises(ConfigurationError, match="invalid kernel id"):
        source.fetch(bad_id)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        check_kernel_id(bad_id)  # type: ignore[arg-type]
