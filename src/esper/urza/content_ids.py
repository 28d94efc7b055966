"""Content addresses: computing and checking the ids that name things in the library.

Blueprints and kernels are named by the sha256 hex digest of their content, compile jobs by 32
random hex digits. Every id that arrives from outside (a caller, an HTTP request) is checked
against these forms before it is used, so a value such as ``../../etc/passwd`` never reaches a
file system path, an object key or a query.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterable, Iterator

from esper.errors import ArtifactIntegrityError, ConfigurationError

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_JOB_ID = re.compile(r"[0-9a-f]{32}")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def sha256_hex(data: bytes) -> str:
    """The content address of ``data``: its sha256 digest as 64 lowercase hex digits."""
    return hashlib.sha256(data).hexdigest()


def check_content_id(value: str, *, what: str = "kernel id") -> str:
    """Return ``value`` if it is a sha256 hex digest, else raise :class:`ConfigurationError`.

    Args:
        value: the id to check.
        what: what the id names, for the message (``"kernel id"``, ``"blueprint id"``).
    """
    if isinstance(value, str) and _SHA256_HEX.fullmatch(value):
        return value
    raise ConfigurationError(
        f"{what} must be a sha256 digest (64 lowercase hex digits), got {_shown(value)}."
    )


def check_job_id(value: str) -> str:
    """Return ``value`` if it is a compile job id (32 lowercase hex digits), else raise."""
    if isinstance(value, str) and _JOB_ID.fullmatch(value):
        return value
    raise ConfigurationError(
        f"compile job id must be 32 lowercase hex digits, got {_shown(value)}."
    )


def new_job_id() -> str:
    """A fresh random compile job id."""
    return uuid.uuid4().hex


def integrity_error(kernel_id: str, actual: str, *, where: str) -> ArtifactIntegrityError:
    """The error for bytes whose digest ``actual`` differs from their content address."""
    return ArtifactIntegrityError(
        f"kernel {kernel_id}: the bytes {where} have sha256 {actual}, expected {kernel_id} "
        "(the kernel id is the sha256 of its artifact). The copy is corrupted or was "
        "truncated; nothing was loaded. Put the artifact again from its source to repair it."
    )


def verify_digest(data: bytes, kernel_id: str, *, where: str) -> bytes:
    """Return ``data`` if its sha256 equals ``kernel_id``, else raise ArtifactIntegrityError."""
    actual = sha256_hex(data)
    if actual != kernel_id:
        raise integrity_error(kernel_id, actual, where=where)
    return data


def verified_chunks(chunks: Iterable[bytes], kernel_id: str, *, where: str) -> Iterator[bytes]:
    """Yield ``chunks``, then raise ArtifactIntegrityError if together they do not hash to the id.

    A consumer of a stream only learns that it was corrupted after the last chunk: it must keep
    what it received aside until the iterator is exhausted without an error.
    """
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
        yield chunk
    actual = digest.hexdigest()
    if actual != kernel_id:
        raise integrity_error(kernel_id, actual, where=where)
