"""Blob stores: where artifact bytes live, keyed by their content address (the local folder store).

A blob store holds immutable objects named by the sha256 hex digest of their bytes. It does not
check digests itself (the library does, on every read); it only guarantees that an object is
either absent or completely written, and that a key is a digest before it is used to build a
path. :class:`LocalBlobStore` (``file://`` URLs) is defined here; the S3-compatible store lives in
:mod:`esper.urza.s3_blobs`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from esper.errors import KernelNotFoundError
from esper.urza.content_ids import check_content_id

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 256 * 1024
"""Chunk size of streamed reads."""


class BlobStore(Protocol):
    """Immutable objects keyed by the sha256 hex digest of their bytes."""

    @property
    def url(self) -> str:
        """Where the store is, as a URL (``file:///…`` or ``s3://…``)."""
        ...

    @property
    def locations(self) -> tuple[str, ...]:
        """Every form of where the store is (URL, folder, endpoint), to keep out of answers."""
        ...

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically, replacing a missing or corrupted copy."""
        ...

    def put_file(self, key: str, file: BinaryIO) -> None:
        """:meth:`put` the bytes of ``file`` (from its current position), streamed."""
        ...

    def get(self, key: str) -> bytes:
        """Return the object's bytes; raise :class:`KernelNotFoundError` when there is none."""
        ...

    def iter_chunks(self, key: str, *, chunk_size: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
        """Open the object now (raising :class:`KernelNotFoundError`) and return its chunks."""
        ...

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""
        ...

    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""
        ...


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(DEFAULT_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _read_chunks(handle: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(chunk_size):
            yield chunk


class LocalBlobStore:
    """Blobs as files in a local folder: ``<root>/<key[:2]>/<key>``.

    Writes go to a temporary file in the destination folder, are flushed to disk, then renamed
    into place, so a reader (or a crash) never sees half an object.

    Args:
        root: the folder; created if missing.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        """The store's ``file://`` URL."""
        return self.root.as_uri()

    @property
    def locations(self) -> tuple[str, ...]:
        """The URL and the folder."""
        return (self.url, str(self.root))

    def path_for(self, key: str) -> Path:
        """The file that holds ``key`` (the key is checked to be a digest first)."""
        check_content_id(key, what="blob key")
        return self.root / key[:2] / key

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` under ``key`` atomically (temp file, fsync, rename).

        An existing file is kept when its bytes hash to ``key``; a corrupted one is replaced.
        """
        self.put_file(key, io.BytesIO(data))

    def put_file(self, key: str, file: BinaryIO) -> None:
        """Copy ``file`` (from its current position) under ``key``, as :meth:`put` does."""
        path = self.path_for(key)
        if path.exists():
            if _file_sha256(path) == key:
                return
            logger.warning("replacing corrupted blob %s at %s", key, path)
        path.parent.mkdir(exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{key[:8]}-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                shutil.copyfileobj(file, handle, DEFAULT_CHUNK_BYTES)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise

    def get(self, key: str) -> bytes:
        """Return the bytes stored under ``key``."""
        path = self.path_for(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise self._not_found(key) from None

    def iter_chunks(self, key: str, *, chunk_size: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
        """Open the file now and return an iterator over its chunks."""
        path = self.path_for(key)
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise self._not_found(key) from None
        return _read_chunks(handle, chunk_size)

    def exists(self, key: str) -> bool:
        """Whether a file is stored under ``key``."""
        return self.path_for(key).is_file()

    def close(self) -> None:
        """Nothing to release for a local folder."""

    def _not_found(self, key: str) -> KernelNotFoundError:
        return KernelNotFoundError(
            f"kernel {key}: no artifact in the blob folder {self.root}. Check the kernel id, or "
            "put the artifact first (a compile job writes it when it succeeds)."
        )
