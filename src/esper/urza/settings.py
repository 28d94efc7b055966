"""Urza settings: the URLs and token that come from the environment, in one object.

=========================  ======================================================================
``ESPER_URZA_URL``         the shared service, ``http(s)://host:port`` (clients use it)
``ESPER_URZA_METADATA_URL`` ``sqlite:///path`` or ``postgresql://user@host:port/db``
``ESPER_URZA_BLOB_URL``    ``file:///path`` or ``s3://bucket/prefix?endpoint_url=…``
``ESPER_URZA_TOKEN``       the service's bearer token (service and clients)
``ESPER_URZA_RUN_DIR``     folder of the embedded defaults (``runs/urza``)
=========================  ======================================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, SecretStr

from esper.urza.api_models import TOKEN_ENV

DEFAULT_RUN_DIR = Path("runs/urza")
"""Where the embedded library keeps ``urza.sqlite3`` and ``blobs/`` unless told otherwise."""

_ENV_NAMES = {
    "url": "ESPER_URZA_URL",
    "metadata_url": "ESPER_URZA_METADATA_URL",
    "blob_url": "ESPER_URZA_BLOB_URL",
    "token": TOKEN_ENV,
    "run_dir": "ESPER_URZA_RUN_DIR",
}


class UrzaSettings(BaseModel):
    """Where the library is and how to authenticate to it.

    Attributes:
        url: the shared service's URL; when set (and no storage URL is given) clients use it.
        metadata_url: SQL database of the storage-backed library.
        blob_url: blob store of the storage-backed library.
        token: bearer token of the service (hidden in ``repr``).
        run_dir: folder of the embedded defaults (``<run_dir>/urza.sqlite3``, ``<run_dir>/blobs``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str | None = None
    metadata_url: str | None = None
    blob_url: str | None = None
    token: SecretStr | None = None
    run_dir: Path = DEFAULT_RUN_DIR

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> UrzaSettings:
        """Settings from ``ESPER_URZA_*`` variables (``os.environ`` unless given); empty = unset."""
        environ = os.environ if environ is None else environ
        values = {field: environ.get(name) for field, name in _ENV_NAMES.items()}
        return cls.model_validate({field: value for field, value in values.items() if value})
