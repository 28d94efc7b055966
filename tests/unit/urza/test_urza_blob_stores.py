"""The local blob folder: content-addressed paths, atomic writes, no path from a bad key."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from esper.errors import ConfigurationError, KernelNotFoundError
from esper.urza.blob_stores import LocalBlobStore


def test_objects_are_fanned_out_by_digest_and_leave_no_temp_files(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    data = b"x" * 70_000
    key = hashlib.sha256(data).hexdigest()

    store.put(key, data)
    store.put(key, data)  # idempotent

    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert files == [Path("blobs") / key[:2] / key]
    assert store.get(key) == data
    assert b"".join(store.iter_chunks(key, chunk_size=65_536)) == data
    assert store.exists(key) and not store.exists("0" * 64)


def test_put_replaces_a_corrupted_copy(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    data = b"kernel bytes"
    key = hashlib.sha256(data).hexdigest()
    store.put(key, data)
    store.path_for(key).write_bytes(b"kernel bytez")

    store.put(key, data)

    assert store.get(key) == data


@pytest.mark.parametrize(
    "key",
    ["../../etc/passwd", "/etc/passwd", "A" * 64, "a" * 63, "a" * 64 + "/..", "", "..", "%2e%2e"],
)
def test_keys_that_are_not_digests_never_become_paths(tmp_path: Path, key: str) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    with pytest.raises(ConfigurationError, match="sha256"):
        store.put(key, b"payload")
    with pytest.raises(ConfigurationError):
        store.get(key)
    with pytest.raises(ConfigurationError):
        store.exists(key)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_missing_object_is_kernel_not_found(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    with pytest.raises(KernelNotFoundError, match=str(tmp_path)):
        store.get("e" * 64)
    with pytest.raises(KernelNotFoundError):
        store.iter_chunks("e" * 64)
