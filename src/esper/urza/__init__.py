"""Urza: the artifact library that stores blueprints, compiled kernels and compile jobs.

One interface, :class:`ArtifactLibrary`, with backends chosen by URL (see :func:`open_library`):

- embedded (default, zero setup): SQLite file + local blob folder, in the training process;
- shared: the same library over PostgreSQL + an S3-compatible bucket, served over HTTP by
  :func:`create_app`/:func:`serve` and reached through :class:`HttpUrza`.

Kernels are content-addressed (id = sha256 of the artifact) and digest-checked on every read;
a put is refused unless the artifact's own header says what its metadata claims.
:class:`UrzaArtifactSource` is what the execution engine's kernel cache fetches bytes through.

Optional dependencies (SQLAlchemy and its drivers, boto3, FastAPI, uvicorn, httpx) are imported
only when a backend that needs them is opened: ``import esper.urza`` imports none of them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from esper.urza.artifact_source import UrzaArtifactSource
from esper.urza.errors import (
    ARTIFACT_REFUSALS,
    ArtifactRefusedError,
    ArtifactTooLargeError,
    AuthenticationError,
    BlueprintNotFoundError,
    JobNotFoundError,
    JobRefusedError,
    JobStateError,
    KernelMetadataMismatchError,
    LibraryBusyError,
    LibraryUnavailableError,
)
from esper.urza.factory import open_blob_store, open_library, open_storage_library
from esper.urza.library import DEFAULT_LEASE_SECONDS, ArtifactLibrary
from esper.urza.settings import ServiceLimits, UrzaSettings

if TYPE_CHECKING:
    from esper.urza.http_client import HttpUrza
    from esper.urza.s3_blobs import S3BlobStore
    from esper.urza.service import create_app, serve
    from esper.urza.service_process import ServiceProcess
    from esper.urza.sql_metadata import SqlMetadataStore
    from esper.urza.storage_library import StorageLibrary

_LAZY = {
    "HttpUrza": "esper.urza.http_client",
    "S3BlobStore": "esper.urza.s3_blobs",
    "ServiceProcess": "esper.urza.service_process",
    "SqlMetadataStore": "esper.urza.sql_metadata",
    "StorageLibrary": "esper.urza.storage_library",
    "create_app": "esper.urza.service",
    "serve": "esper.urza.service",
}


def __getattr__(name: str) -> Any:
    """Import backend modules on first use, so that ``import esper.urza`` stays light."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'esper.urza' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "ARTIFACT_REFUSALS",
    "DEFAULT_LEASE_SECONDS",
    "ArtifactLibrary",
    "ArtifactRefusedError",
    "ArtifactTooLargeError",
    "AuthenticationError",
    "BlueprintNotFoundError",
    "HttpUrza",
    "JobNotFoundError",
    "JobRefusedError",
    "JobStateError",
    "KernelMetadataMismatchError",
    "LibraryBusyError",
    "LibraryUnavailableError",
    "S3BlobStore",
    "ServiceLimits",
    "ServiceProcess",
    "SqlMetadataStore",
    "StorageLibrary",
    "UrzaArtifactSource",
    "UrzaSettings",
    "create_app",
    "open_blob_store",
    "open_library",
    "open_storage_library",
    "serve",
]
