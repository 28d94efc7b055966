"""Opening a library from URLs: the one place that maps a URL scheme to a backend.

==========================================  =================================================
``open_library("http(s)://host:port")``       :class:`~esper.urza.http_client.HttpUrza` (service)
``metadata_url="sqlite:///path"``             SQLite file (the embedded default)
``metadata_url="postgresql://u@h:p/db"``      PostgreSQL through psycopg 3
``blob_url="file:///path"`` or a plain path   local folder (the embedded default)
``blob_url="s3://bucket/prefix?endpoint_url=…"``  S3-compatible bucket (credentials from the env)
==========================================  =================================================

With nothing given, settings come from ``ESPER_URZA_*`` variables
(:class:`~esper.urza.settings.UrzaSettings`), and without those the library is embedded:
``runs/urza/urza.sqlite3`` and ``runs/urza/blobs``. Backends are imported only when opened.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

from esper.errors import ConfigurationError
from esper.urza.blob_stores import BlobStore, LocalBlobStore
from esper.urza.library import ArtifactLibrary
from esper.urza.settings import UrzaSettings

SERVICE_SCHEMES = ("http", "https")
METADATA_SCHEMES = ("sqlite", "postgresql")
BLOB_SCHEMES = ("file", "s3")

_ACCEPTED = (
    "open_library('http(s)://host:port') for the shared service, or "
    "open_library(metadata_url='sqlite:///path' | 'postgresql://user@host:port/db', "
    "blob_url='file:///path' | 's3://bucket/prefix?endpoint_url=…')"
)


def open_library(
    url: str | None = None,
    *,
    metadata_url: str | None = None,
    blob_url: str | None = None,
    token: str | None = None,
    run_dir: str | Path | None = None,
    settings: UrzaSettings | None = None,
) -> ArtifactLibrary:
    """Open the artifact library that the arguments (or the environment) point at.

    Args:
        url: the shared service, ``http(s)://host:port``; excludes the storage URLs.
        metadata_url: SQL database of a storage-backed library.
        blob_url: blob store of a storage-backed library.
        token: the service's bearer token (``ESPER_URZA_TOKEN`` when ``None``).
        run_dir: folder of the embedded defaults.
        settings: fallback for every argument left ``None``; read from the environment when
            not given.

    Raises:
        ConfigurationError: for an unknown scheme or a service URL mixed with storage URLs.
    """
    settings = settings or UrzaSettings.from_env()
    if url is not None and (metadata_url is not None or blob_url is not None):
        raise ConfigurationError(
            f"open_library got a service URL {url!r} and storage URLs; give one or the other: "
            f"{_ACCEPTED}."
        )
    if url is None and metadata_url is None and blob_url is None:
        url = settings.url
    if url is not None:
        return _open_service(url, token=token, settings=settings)
    return open_storage_library(
        metadata_url=metadata_url or settings.metadata_url,
        blob_url=blob_url or settings.blob_url,
        run_dir=run_dir if run_dir is not None else settings.run_dir,
    )


def _open_service(url: str, *, token: str | None, settings: UrzaSettings) -> ArtifactLibrary:
    scheme = urlsplit(url).scheme
    if scheme not in SERVICE_SCHEMES:
        raise ConfigurationError(
            f"library URL {url!r} has scheme {scheme!r}; a single URL must name the service "
            f"({', '.join(s + '://' for s in SERVICE_SCHEMES)}). Accepted: {_ACCEPTED}."
        )
    from esper.urza.http_client import HttpUrza

    if token is None and settings.token is not None:
        token = settings.token.get_secret_value()
    return HttpUrza(url, token=token)


def open_storage_library(
    *,
    metadata_url: str | None = None,
    blob_url: str | None = None,
    run_dir: str | Path | None = None,
) -> ArtifactLibrary:
    """Open a storage-backed library (what the embedded mode and the service use).

    Args:
        metadata_url: ``sqlite:///…`` or ``postgresql://…``; ``sqlite:///<run_dir>/urza.sqlite3``
            when ``None``.
        blob_url: ``file:///…``, a folder path, or ``s3://…``; ``<run_dir>/blobs`` when ``None``.
        run_dir: folder of the defaults (``runs/urza`` when ``None``).
    """
    from esper.urza.sql_metadata import SqlMetadataStore
    from esper.urza.storage_library import StorageLibrary

    folder = Path(run_dir if run_dir is not None else UrzaSettings().run_dir).expanduser().resolve()
    if metadata_url is None:
        metadata_url = f"sqlite:///{folder / 'urza.sqlite3'}"
    elif urlsplit(metadata_url).scheme.split("+")[0] not in (*METADATA_SCHEMES, "postgres"):
        raise ConfigurationError(
            f"metadata URL {metadata_url!r} has an unsupported scheme; accepted: "
            f"{', '.join(METADATA_SCHEMES)} ({_ACCEPTED})."
        )
    blobs = open_blob_store(blob_url if blob_url is not None else str(folder / "blobs"))
    try:
        metadata = SqlMetadataStore(metadata_url)
    except BaseException:
        blobs.close()
        raise
    return StorageLibrary(metadata=metadata, blobs=blobs)


def open_blob_store(url: str) -> BlobStore:
    """The blob store at ``url``: ``file:///path``, a plain folder path, or ``s3://…``."""
    parts = urlsplit(url)
    if parts.scheme == "s3":
        from esper.urza.s3_blobs import S3BlobStore

        return S3BlobStore.from_url(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigurationError(
                f"blob URL {url!r} names host {parts.netloc!r}; a local folder URL has three "
                "slashes and an absolute path: file:///var/esper/blobs."
            )
        return LocalBlobStore(url2pathname(parts.path))
    if parts.scheme == "" or len(parts.scheme) == 1:  # a plain path (or a Windows drive letter)
        return LocalBlobStore(url)
    raise ConfigurationError(
        f"blob URL {url!r} has an unsupported scheme {parts.scheme!r}; accepted: "
        f"{', '.join(s + '://' for s in BLOB_SCHEMES)} or a folder path."
    )
