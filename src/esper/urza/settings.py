"""Urza settings: the URLs, token and service limits that come from the environment, in one object.

==================================  ===============================================================
``ESPER_URZA_URL``                   the shared service, ``http(s)://host:port`` (clients use it)
``ESPER_URZA_METADATA_URL``          ``sqlite:///path`` or ``postgresql://user@host:port/db``
``ESPER_URZA_BLOB_URL``              ``file:///path`` or ``s3://bucket/prefix?endpoint_url=…``
``ESPER_URZA_TOKEN``                 the service's bearer token (service and clients)
``ESPER_URZA_RUN_DIR``               folder of the embedded defaults (``runs/urza``)
``ESPER_URZA_MAX_ARTIFACT_BYTES``    service: largest kernel upload (512 MiB)
``ESPER_URZA_MAX_CONCURRENT_UPLOADS``  service: uploads in progress at once (8)
``ESPER_URZA_MAX_REQUEST_BYTES``     service: largest JSON request body (1 MiB)
``ESPER_URZA_MAX_KERNEL_PARAMETERS`` service: largest kernel a compile job may ask for (unlimited)
==================================  ===============================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from esper.contracts.bounds import MAX_ARTIFACT_BYTES, MAX_PARAMETERS
from esper.errors import ConfigurationError
from esper.urza.api_models import TOKEN_ENV

DEFAULT_RUN_DIR = Path("runs/urza")
"""Where the embedded library keeps ``urza.sqlite3`` and ``blobs/`` unless told otherwise."""

DEFAULT_MAX_ARTIFACT_BYTES = 512 * 1024 * 1024
"""Largest kernel upload the service accepts by default."""


class ServiceLimits(BaseModel):
    """What one Urza service accepts: sizes of uploads and requests, and of the kernels it queues.

    Attributes:
        max_artifact_bytes: uploads larger than this are refused (413), and so are compile jobs
            whose kernel's tensors alone would be larger.
        max_concurrent_uploads: uploads in progress at once; one more is answered 503 (retry).
            Bounds the temporary disk the service uses to ``max_concurrent_uploads *
            max_artifact_bytes``.
        max_request_bytes: largest JSON request body (blueprints, job requests, searches).
        max_kernel_parameters: compile jobs and uploads of kernels with more parameters are
            refused; ``None``: only ``max_artifact_bytes`` bounds them.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_artifact_bytes: int = Field(default=DEFAULT_MAX_ARTIFACT_BYTES, gt=0, le=MAX_ARTIFACT_BYTES)
    max_concurrent_uploads: int = Field(default=8, gt=0, le=10_000)
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_kernel_parameters: int | None = Field(default=None, gt=0, le=MAX_PARAMETERS)

    def updated(self, **changes: int | None) -> ServiceLimits:
        """These limits with ``changes`` applied (``None`` values ignored), validated.

        Raises:
            ConfigurationError: a value is out of its range (the message names the option).
        """
        given = {field: value for field, value in changes.items() if value is not None}
        try:
            return ServiceLimits.model_validate(self.model_dump() | given)
        except ValidationError as error:
            problems = "; ".join(
                f"--{str(err['loc'][-1]).replace('_', '-')}: {err['msg']}"
                for err in error.errors(include_url=False)
            )
            raise ConfigurationError(f"invalid Urza service limits: {problems}") from None


_ENV_NAMES = {
    "url": "ESPER_URZA_URL",
    "metadata_url": "ESPER_URZA_METADATA_URL",
    "blob_url": "ESPER_URZA_BLOB_URL",
    "token": TOKEN_ENV,
    "run_dir": "ESPER_URZA_RUN_DIR",
}
_LIMIT_ENV_NAMES = {field: f"ESPER_URZA_{field.upper()}" for field in ServiceLimits.model_fields}


class UrzaSettings(BaseModel):
    """Where the library is, how to authenticate to it, and what the service accepts.

    Attributes:
        url: the shared service's URL; when set (and no storage URL is given) clients use it.
        metadata_url: SQL database of the storage-backed library.
        blob_url: blob store of the storage-backed library.
        token: bearer token of the service (hidden in ``repr``).
        run_dir: folder of the embedded defaults (``<run_dir>/urza.sqlite3``, ``<run_dir>/blobs``).
        limits: the service's limits.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str | None = None
    metadata_url: str | None = None
    blob_url: str | None = None
    token: SecretStr | None = None
    run_dir: Path = DEFAULT_RUN_DIR
    limits: ServiceLimits = ServiceLimits()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> UrzaSettings:
        """Settings from ``ESPER_URZA_*`` variables (``os.environ`` unless given); empty = unset.

        Raises:
            ConfigurationError: a limit variable is not a number in its range.
        """
        environ = os.environ if environ is None else environ
        values = {field: environ.get(name) for field, name in _ENV_NAMES.items()}
        limits = {field: environ.get(name) for field, name in _LIMIT_ENV_NAMES.items()}
        try:
            return cls.model_validate(
                {field: value for field, value in values.items() if value}
                | {"limits": {field: value for field, value in limits.items() if value}}
            )
        except ValidationError as error:
            problems = "; ".join(
                f"{_variable(err['loc'])}: {err['msg']}" for err in error.errors(include_url=False)
            )
            raise ConfigurationError(
                f"invalid Urza settings in the environment: {problems}"
            ) from None


def _variable(location: tuple[int | str, ...]) -> str:
    field = str(location[-1])
    return _LIMIT_ENV_NAMES.get(field) or _ENV_NAMES.get(field) or field
