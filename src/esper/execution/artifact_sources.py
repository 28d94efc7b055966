"""Artifact sources: where a kernel cache fetches artifact bytes from (a folder, memory, Urza).

A source is anything with ``fetch(kernel_id) -> bytes`` that raises
:class:`~esper.errors.KernelNotFoundError` for an unknown id; the cache verifies the bytes'
digest itself, so a source need not be trusted.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Protocol

from esper.blueprints import sha256_hex
from esper.errors import (
    AmbiguousKernelNameError,
    ArgumentTypeError,
    ConfigurationError,
    KernelNotFoundError,
)
from esper.execution.arguments import shown

_KERNEL_ID = re.compile(r"[0-9a-f]{64}")
"""A kernel id, matched with ``fullmatch`` (``$`` would accept a trailing newline)."""
ARTIFACT_SUFFIX = ".safetensors"


class ArtifactSource(Protocol):
    """Anything kernel artifact bytes can be fetched from by id."""

    def fetch(self, kernel_id: str) -> bytes:
        """The artifact's bytes; :class:`KernelNotFoundError` if there is no such artifact."""
        ...


def _artifact_bytes(data: object) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ArgumentTypeError(
            f"artifact data must be bytes, got {shown(data)} ({type(data).__name__})"
        )
    return bytes(data)


def check_kernel_id(kernel_id: str) -> str:
    """Return ``kernel_id`` if it is a sha256 hex digest, else raise :class:`ConfigurationError`."""
    if not isinstance(kernel_id, str) or not _KERNEL_ID.fullmatch(kernel_id):
        raise ConfigurationError(
            f"invalid kernel id {shown(kernel_id)}: expected the 64-character lowercase sha256 hex "
            "digest of a kernel artifact"
        )
    return kernel_id


class InMemoryArtifactSource:
    """Artifacts held in a dict (tests, demos, and artifacts compiled in-process)."""

    def __init__(self) -> None:
        self._artifacts: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def add(self, data: bytes) -> str:
        """Store ``data`` and return its kernel id (its sha256)."""
        data = _artifact_bytes(data)
        kernel_id = sha256_hex(data)
        with self._lock:
            self._artifacts[kernel_id] = data
        return kernel_id

    def resolve(self, name: str) -> str:
        """The one stored kernel id that starts with ``name`` (6+ hex digits).

        Raises:
            KernelNotFoundError: no stored id starts with ``name`` (an in-memory source keeps
                no aliases).
            AmbiguousKernelNameError: several do.
        """
        with self._lock:
            matches = [kernel_id for kernel_id in self._artifacts if kernel_id.startswith(name)]
        if len(name) < 6 or not matches:
            raise KernelNotFoundError(
                f"no kernel {name!r} in this in-memory source: it keeps no aliases, and no stored "
                "id starts with it (an id prefix needs at least 6 hex digits)"
            )
        if len(matches) > 1:
            raise AmbiguousKernelNameError(
                f"kernel id prefix {name!r} matches {len(matches)} kernels in this in-memory "
                "source; give more digits of the id"
            )
        return matches[0]

    def fetch(self, kernel_id: str) -> bytes:
        """The stored bytes for ``kernel_id``."""
        with self._lock:
            data = self._artifacts.get(check_kernel_id(kernel_id))
        if data is None:
            raise KernelNotFoundError(f"kernel {kernel_id} is not in this in-memory source")
        return data


class DirectoryArtifactSource:
    """Artifacts stored as ``<kernel_id>.safetensors`` files in one local folder."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        if not isinstance(root, str | os.PathLike):
            raise ArgumentTypeError(f"root must be a folder path, got {shown(root)}")
        self.root = Path(root)

    def path_of(self, kernel_id: str) -> Path:
        """Where the artifact ``kernel_id`` lives (the id is validated: no path traversal)."""
        return self.root / f"{check_kernel_id(kernel_id)}{ARTIFACT_SUFFIX}"

    def add(self, data: bytes) -> str:
        """Write ``data`` atomically (temp file + rename) and return its kernel id."""
        data = _artifact_bytes(data)
        kernel_id = sha256_hex(data)
        path = self.path_of(kernel_id)
        if path.exists():
            return kernel_id
        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.root, delete=False, suffix=".partial") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp.name, path)
        return kernel_id

    def fetch(self, kernel_id: str) -> bytes:
        """The bytes of ``<root>/<kernel_id>.safetensors``."""
        path = self.path_of(kernel_id)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise KernelNotFoundError(f"kernel {kernel_id} not found: no file {path}") from None
