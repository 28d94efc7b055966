"""Wire models of the Urza HTTP API: the request and error bodies the service and client share.

Responses are the contracts themselves (:class:`~esper.contracts.BlueprintRecord`,
:class:`~esper.contracts.KernelMetadata`, :class:`~esper.contracts.CompileJob`,
:class:`~esper.contracts.LibraryStats`); these models only describe what a request carries.
A kernel upload is the artifact's raw bytes as the body, with its metadata as base64url-encoded
JSON in the :data:`METADATA_HEADER` header.
"""

from __future__ import annotations

import base64
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from esper.contracts import (
    BlueprintSpec,
    BlueprintStatus,
    KernelId,
    KernelMetadata,
    KernelTarget,
)
from esper.contracts.bounds import DeviceName, DtypeName, InitSeed, Name, Text
from esper.urza.library import MAX_LEASE_SECONDS
from esper.urza.pagination import MAX_OFFSET, MAX_PAGE_SIZE

TOKEN_ENV = "ESPER_URZA_TOKEN"
"""Environment variable that holds the service's bearer token (read by service and client)."""

METADATA_HEADER = "X-Esper-Kernel-Metadata"
"""Header of a kernel upload: the :class:`KernelMetadata` JSON, base64url-encoded."""

KERNEL_ID_HEADER = "X-Esper-Kernel-Id"
"""Header of a kernel download: the id (sha256) the streamed bytes must hash to."""

WorkerId = Name
"""Name of a compile worker (free text, 1-200 characters)."""

PageLimit = Annotated[int, Field(ge=1, le=MAX_PAGE_SIZE)]
"""Rows in one page of a list."""

PageOffset = Annotated[int, Field(ge=0, le=MAX_OFFSET)]
"""Rows skipped before a page."""


class WireModel(BaseModel):
    """A request body: strict about unknown fields, immutable."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class BlueprintSubmission(WireModel):
    """Body of ``POST /blueprints``."""

    spec: BlueprintSpec
    name: Name | None = None


class BlueprintStatusChange(WireModel):
    """Body of ``PUT /blueprints/{blueprint_id}/status``."""

    status: BlueprintStatus
    reason: Text | None = None


class KernelQuery(WireModel):
    """Body of ``POST /kernels/search``: every given filter must match."""

    blueprint_id: KernelId | None = None
    target: KernelTarget | None = None
    device: DeviceName | None = None
    dtype: DtypeName | None = None
    init_seed: InitSeed | None = None
    limit: PageLimit = MAX_PAGE_SIZE
    offset: PageOffset = 0


class JobRequest(WireModel):
    """Body of ``POST /jobs``."""

    blueprint_id: KernelId
    target: KernelTarget
    init_seed: InitSeed = 0


class ClaimRequest(WireModel):
    """Body of ``POST /jobs/claim`` and ``POST /jobs/{job_id}/lease``."""

    worker_id: WorkerId
    lease_seconds: float = Field(gt=0, le=MAX_LEASE_SECONDS, allow_inf_nan=False)


class JobCompletion(WireModel):
    """Body of ``POST /jobs/{job_id}/complete``."""

    worker_id: WorkerId
    kernel_id: KernelId


class JobFailure(WireModel):
    """Body of ``POST /jobs/{job_id}/fail``."""

    worker_id: WorkerId
    error: Text


class AliasRequest(WireModel):
    """Body of ``PUT /aliases/{name}``: the kernel the alias is to name, and whether an alias
    naming another kernel may be moved."""

    kernel_id: KernelId
    move: bool = False


class ResolvedName(WireModel):
    """Answer of ``GET /resolve?name=…``: the kernel id a name stands for."""

    name: str
    kernel_id: KernelId


class ErrorBody(WireModel):
    """Body of every error the service raises itself: the error class name and its message."""

    error: str
    detail: str


def encode_metadata_header(metadata: KernelMetadata) -> str:
    """The value of :data:`METADATA_HEADER` for ``metadata``."""
    return base64.urlsafe_b64encode(metadata.model_dump_json().encode()).decode("ascii")


def decode_metadata_header(value: str) -> KernelMetadata:
    """Parse a :data:`METADATA_HEADER` value (raises ``ValueError`` when malformed)."""
    try:
        text = base64.urlsafe_b64decode(value.encode("ascii")).decode()
    except (ValueError, UnicodeError) as error:
        raise ValueError(f"{METADATA_HEADER} is not base64url-encoded JSON: {error}") from None
    return KernelMetadata.model_validate_json(text)
