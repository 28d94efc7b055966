"""S3 blob store: artifact bytes in an S3-compatible bucket (``s3://bucket/prefix`` URLs).

Objects are stored under ``<prefix>/<sha256 hex>``; an S3 PUT is atomic, so a reader sees either
no object or all of it. Credentials come from the environment through boto3's usual chain
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile, an instance role); the endpoint of a
non-AWS server (MinIO, Ceph, moto) is given in the URL: ``s3://bucket/prefix?endpoint_url=http://…``.
boto3 is imported when a store is created, never when :mod:`esper.urza` is imported.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO
from urllib.parse import parse_qs, urlsplit

from esper.errors import ConfigurationError, KernelNotFoundError
from esper.urza.blob_stores import DEFAULT_CHUNK_BYTES
from esper.urza.content_ids import check_content_id

_QUERY_OPTIONS = ("endpoint_url", "region")


def _is_missing(error: Exception) -> bool:
    response = getattr(error, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    return code in {"404", "NoSuchKey", "NotFound"}


class S3BlobStore:
    """Blobs as objects in an S3-compatible bucket.

    Args:
        bucket: bucket name (the bucket must exist).
        prefix: key prefix inside the bucket, without leading or trailing ``/``.
        endpoint_url: endpoint of a non-AWS S3 server, e.g. ``http://127.0.0.1:9000``.
        region: region name; boto3's default chain when ``None``.
    """

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        session = boto3.session.Session()
        self._client: Any = session.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}),
        )

    @classmethod
    def from_url(cls, url: str) -> S3BlobStore:
        """A store for ``s3://bucket[/prefix][?endpoint_url=…&region=…]``."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ConfigurationError(
                f"S3 blob URL must look like s3://bucket/prefix?endpoint_url=http://host:port, "
                f"got {url!r}."
            )
        query = parse_qs(parts.query)
        unknown = sorted(set(query) - set(_QUERY_OPTIONS))
        if unknown:
            raise ConfigurationError(
                f"S3 blob URL {url!r} has unknown options {unknown}; accepted: "
                f"{', '.join(_QUERY_OPTIONS)}."
            )
        return cls(
            bucket=parts.netloc,
            prefix=parts.path,
            endpoint_url=query.get("endpoint_url", [None])[0],
            region=query.get("region", [None])[0],
        )

    @property
    def url(self) -> str:
        """The store's ``s3://`` URL (without credentials, which never appear in it)."""
        query = f"?endpoint_url={self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{query}"

    @property
    def locations(self) -> tuple[str, ...]:
        """The URL, the bucket's URL and the endpoint."""
        return tuple(x for x in (self.url, f"s3://{self.bucket}", self.endpoint_url) if x)

    def object_key(self, key: str) -> str:
        """The S3 object key of blob ``key`` (the key is checked to be a digest first)."""
        check_content_id(key, what="blob key")
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes) -> None:
        """Upload ``data`` under ``key`` (an S3 PUT replaces the object atomically)."""
        self._client.put_object(Bucket=self.bucket, Key=self.object_key(key), Body=data)

    def put_file(self, key: str, file: BinaryIO) -> None:
        """Upload the bytes of ``file`` (from its current position to its end) under ``key``."""
        self._client.put_object(Bucket=self.bucket, Key=self.object_key(key), Body=file)

    def get(self, key: str) -> bytes:
        """Download the object stored under ``key``."""
        return b"".join(self.iter_chunks(key, chunk_size=DEFAULT_CHUNK_BYTES))

    def iter_chunks(self, key: str, *, chunk_size: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
        """Start the download now (raising when missing) and return the body's chunks."""
        object_key = self.object_key(key)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=object_key)
        except Exception as error:
            if _is_missing(error):
                raise KernelNotFoundError(
                    f"kernel {key}: no object s3://{self.bucket}/{object_key}. Check the kernel "
                    "id and that this library points at the right bucket and prefix."
                ) from None
            raise
        body = response["Body"]
        return self._drain(body, chunk_size)

    @staticmethod
    def _drain(body: Any, chunk_size: int) -> Iterator[bytes]:
        try:
            yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""
        try:
            self._client.head_object(Bucket=self.bucket, Key=self.object_key(key))
        except Exception as error:
            if _is_missing(error):
                return False
            raise
        return True

    def close(self) -> None:
        """Close the client's connection pool."""
        self._client.close()
