"""HttpUrza: the artifact library of a remote Urza service, behind the same interface (httpx).

``HttpUrza`` implements :class:`~esper.urza.library.ArtifactLibrary`, so code that holds a
library does not care whether it is embedded or shared. Downloads are checked against the kernel
id on this side of the network too. Failures read as what to fix: an unreachable service raises
:class:`~esper.urza.errors.LibraryUnavailableError` naming the URL, a rejected token
:class:`~esper.urza.errors.AuthenticationError` naming ``ESPER_URZA_TOKEN``, and errors the
library raised on the server (unknown ids, digest mismatches, job conflicts) are raised again
here as the same class. httpx is imported with this module, never by ``import esper.urza``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, NoReturn, TypeVar

import httpx
from pydantic import TypeAdapter, ValidationError

from esper.contracts import (
    BlueprintRecord,
    BlueprintSpec,
    BlueprintStatus,
    CompileJob,
    CompileJobStatus,
    KernelAlias,
    KernelMetadata,
    KernelTarget,
    LibraryStats,
)
from esper.contracts.bounds import text_within_bounds
from esper.errors import ConfigurationError, EsperError
from esper.urza.api_models import (
    METADATA_HEADER,
    TOKEN_ENV,
    AliasRequest,
    BlueprintStatusChange,
    BlueprintSubmission,
    ClaimRequest,
    JobCompletion,
    JobFailure,
    JobRequest,
    KernelQuery,
    ResolvedName,
    WireModel,
    encode_metadata_header,
)
from esper.urza.blob_stores import DEFAULT_CHUNK_BYTES
from esper.urza.content_ids import check_content_id, check_job_id, verified_chunks, verify_digest
from esper.urza.errors import (
    WIRE_ERRORS,
    ArtifactTooLargeError,
    AuthenticationError,
    LibraryUnavailableError,
)
from esper.urza.kernel_names import check_alias_name, check_kernel_name
from esper.urza.library import DEFAULT_LEASE_SECONDS
from esper.urza.pagination import MAX_PAGE_SIZE, check_page
from esper.urza.settings import ServiceLimits

T = TypeVar("T")

_BLUEPRINTS = TypeAdapter(list[BlueprintRecord])
_KERNELS = TypeAdapter(list[KernelMetadata])
_JOBS = TypeAdapter(list[CompileJob])
_MAYBE_JOB = TypeAdapter(CompileJob | None)
_ALIASES = TypeAdapter(list[KernelAlias])
_KERNEL_ID = re.compile(r"[0-9a-f]{64}")
logger = logging.getLogger(__name__)


def _body(model: type[WireModel], **fields: Any) -> dict[str, Any]:
    """A request body as JSON data, checked here so a bad argument fails before any I/O."""
    try:
        return model(**fields).model_dump(mode="json")
    except ValidationError as error:
        raise ConfigurationError(f"invalid {model.__name__}: {error}") from None


class HttpUrza:
    """Client of the Urza HTTP service.

    Safe to share between threads (one pooled ``httpx.Client``).

    Args:
        url: the service, e.g. ``http://urza.internal:8765``.
        token: bearer token; ``ESPER_URZA_TOKEN`` when ``None``.
        timeout: seconds to wait for a connection or for the next bytes of a response.
        client: an ``httpx.Client`` to send requests through (e.g. a test client); the
            library does not close a client it was given.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        client: httpx.Client | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"HttpUrza needs the service's http(s):// URL, got {url!r}; "
                "for a local library use open_library(metadata_url=..., blob_url=...)."
            )
        self.url = url.rstrip("/")
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._owns_client = client is None
        self._client = client or httpx.Client(timeout=timeout)
        self._limits: ServiceLimits | None = None

    def __repr__(self) -> str:
        return f"HttpUrza({self.url!r})"

    def __enter__(self) -> HttpUrza:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # Transport ----------------------------------------------------------------------------

    def _unreachable(self, error: httpx.TransportError) -> LibraryUnavailableError:
        return LibraryUnavailableError(
            f"could not reach the Urza service at {self.url} ({type(error).__name__}: {error}). "
            "Check that the service is running (esper urza serve --host … --port …) and "
            "that the URL's host and port are right (ESPER_URZA_URL)."
        )

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self._headers, **kwargs.pop("headers", {})}
        try:
            response = self._client.request(method, self.url + path, headers=headers, **kwargs)
        except httpx.TransportError as error:
            raise self._unreachable(error) from error
        if response.is_success:
            return response
        self._raise_for(response)

    def _raise_for(self, response: httpx.Response) -> NoReturn:
        where = f"{response.request.method} {self.url}{response.request.url.path}"
        try:
            body = response.json()
        except ValueError:
            body = None
        error_name = body.get("error") if isinstance(body, dict) else None
        detail = body.get("detail") if isinstance(body, dict) else None
        if response.status_code == 401:
            raise AuthenticationError(
                f"the Urza service at {self.url} refused {where} (401: {detail}). Set "
                f"{TOKEN_ENV} (or pass token=...) to the token the service was started with."
            )
        if isinstance(error_name, str) and error_name in WIRE_ERRORS:
            raise WIRE_ERRORS[error_name](str(detail))
        if response.status_code == 422:
            raise ConfigurationError(f"the Urza service rejected {where} as invalid: {detail}")
        if response.status_code == 503:
            raise LibraryUnavailableError(
                f"the Urza service at {self.url} is unavailable for {where} (503: "
                f"{detail if detail is not None else response.text[:300]}); retry later."
            )
        if response.status_code == 404:
            raise LibraryUnavailableError(
                f"{where} answered 404 without an Urza error: is {self.url} an Urza service "
                "(check ESPER_URZA_URL)?"
            )
        raise EsperError(
            f"the Urza service at {self.url} failed {where} with HTTP {response.status_code}: "
            f"{detail if detail is not None else response.text[:300]}"
        )

    def _pages(
        self, fetch: Callable[[int, int], list[T]], limit: int | None, offset: int
    ) -> list[T]:
        """One page (``limit`` rows), or every row from ``offset`` on, page after page."""
        limit, offset = check_page(limit, offset)
        if limit is not None:
            return fetch(limit, offset)
        rows: list[T] = []
        while True:
            page = fetch(MAX_PAGE_SIZE, offset)
            rows += page
            if len(page) < MAX_PAGE_SIZE:
                return rows
            offset += len(page)

    def limits(self) -> ServiceLimits:
        """What the service accepts (asked once, then remembered)."""
        if self._limits is None:
            response = self._request("GET", "/limits")
            self._limits = ServiceLimits.model_validate_json(response.content)
        return self._limits

    # Blueprints ---------------------------------------------------------------------------

    def submit_blueprint(self, spec: BlueprintSpec, *, name: str | None = None) -> BlueprintRecord:
        """Store ``spec`` under its content id (idempotent)."""
        body = _body(BlueprintSubmission, spec=spec, name=name)
        response = self._request("POST", "/blueprints", json=body)
        return BlueprintRecord.model_validate_json(response.content)

    def get_blueprint(self, blueprint_id: str) -> BlueprintRecord:
        """The record of one blueprint."""
        check_content_id(blueprint_id, what="blueprint id")
        response = self._request("GET", f"/blueprints/{blueprint_id}")
        return BlueprintRecord.model_validate_json(response.content)

    def list_blueprints(
        self, status: BlueprintStatus | None = None, *, limit: int | None = None, offset: int = 0
    ) -> list[BlueprintRecord]:
        """Blueprints, oldest first (one page, or every one when ``limit`` is ``None``)."""
        params: dict[str, str | int] = {}
        if status is not None:
            params["status"] = BlueprintStatus(status).value

        def fetch(page_limit: int, page_offset: int) -> list[BlueprintRecord]:
            page = {**params, "limit": page_limit, "offset": page_offset}
            response = self._request("GET", "/blueprints", params=page)
            return _BLUEPRINTS.validate_json(response.content)

        return self._pages(fetch, limit, offset)

    def set_blueprint_status(
        self, blueprint_id: str, status: BlueprintStatus, reason: str | None = None
    ) -> BlueprintRecord:
        """Change a blueprint's status."""
        check_content_id(blueprint_id, what="blueprint id")
        if reason is not None:
            reason = text_within_bounds(str(reason))
        body = _body(BlueprintStatusChange, status=status, reason=reason)
        response = self._request("PUT", f"/blueprints/{blueprint_id}/status", json=body)
        return BlueprintRecord.model_validate_json(response.content)

    # Kernels ------------------------------------------------------------------------------

    def put_kernel(self, artifact: bytes, metadata: KernelMetadata) -> KernelMetadata:
        """Upload an artifact with its metadata (the service checks bytes against metadata).

        An artifact over the service's size limit is refused here, before it is sent.
        """
        most = self.limits().max_artifact_bytes
        if metadata.size_bytes > most:
            raise ArtifactTooLargeError(
                f"kernel {metadata.kernel_id} is {metadata.size_bytes} bytes; the Urza service at "
                f"{self.url} accepts at most {most} (its --max-artifact-bytes); nothing was sent."
            )
        response = self._request(
            "PUT",
            f"/kernels/{metadata.kernel_id}",
            content=artifact,
            headers={
                METADATA_HEADER: encode_metadata_header(metadata),
                "Content-Type": "application/octet-stream",
            },
        )
        return KernelMetadata.model_validate_json(response.content)

    def get_kernel_bytes(self, kernel_id: str) -> bytes:
        """Download an artifact and check it against the id."""
        data = b"".join(self._download(kernel_id, chunk_size=DEFAULT_CHUNK_BYTES))
        return verify_digest(data, kernel_id, where=f"downloaded from {self.url}")

    def iter_kernel_chunks(
        self, kernel_id: str, *, chunk_size: int = DEFAULT_CHUNK_BYTES
    ) -> Iterator[bytes]:
        """Stream an artifact; the request is sent now, the digest checked after the last chunk."""
        chunks = self._download(kernel_id, chunk_size=chunk_size)
        return verified_chunks(chunks, kernel_id, where=f"streamed from {self.url}")

    def _download(self, kernel_id: str, *, chunk_size: int) -> Iterator[bytes]:
        check_content_id(kernel_id)
        request = self._client.build_request(
            "GET", f"{self.url}/kernels/{kernel_id}", headers=self._headers
        )
        try:
            response = self._client.send(request, stream=True)
        except httpx.TransportError as error:
            raise self._unreachable(error) from error
        if not response.is_success:
            try:
                response.read()
            finally:
                response.close()
            self._raise_for(response)
        return self._body_chunks(response, chunk_size)

    def _body_chunks(self, response: httpx.Response, chunk_size: int) -> Iterator[bytes]:
        try:
            yield from response.iter_bytes(chunk_size)
        except httpx.TransportError as error:
            raise self._unreachable(error) from error
        finally:
            response.close()

    def get_kernel_metadata(self, kernel_id: str) -> KernelMetadata:
        """The metadata stored with a kernel."""
        check_content_id(kernel_id)
        response = self._request("GET", f"/kernels/{kernel_id}/metadata")
        return KernelMetadata.model_validate_json(response.content)

    def find_kernels(
        self,
        *,
        blueprint_id: str | None = None,
        target: KernelTarget | None = None,
        device: str | None = None,
        dtype: str | None = None,
        init_seed: int | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[KernelMetadata]:
        """Kernels matching every given filter, oldest first (one page, or all)."""
        if blueprint_id is not None:
            check_content_id(blueprint_id, what="blueprint id")

        def fetch(page_limit: int, page_offset: int) -> list[KernelMetadata]:
            query = _body(
                KernelQuery,
                blueprint_id=blueprint_id,
                target=target,
                device=device,
                dtype=dtype,
                init_seed=init_seed,
                limit=page_limit,
                offset=page_offset,
            )
            response = self._request("POST", "/kernels/search", json=query)
            return _KERNELS.validate_json(response.content)

        return self._pages(fetch, limit, offset)

    # Kernel names -------------------------------------------------------------------------

    def tag_kernel(self, name: str, kernel_id: str, *, move: bool = False) -> KernelAlias:
        """Make the alias ``name`` name a stored kernel (``move=True`` to re-point it)."""
        check_alias_name(name)
        body = _body(AliasRequest, kernel_id=kernel_id, move=move)
        response = self._request("PUT", f"/aliases/{name}", json=body)
        return KernelAlias.model_validate_json(response.content)

    def list_aliases(
        self, *, kernel_id: str | None = None, limit: int | None = None, offset: int = 0
    ) -> list[KernelAlias]:
        """Aliases in name order, optionally only those of ``kernel_id`` (a page)."""
        if kernel_id is not None:
            check_content_id(kernel_id)

        def fetch(page_limit: int, page_offset: int) -> list[KernelAlias]:
            page: dict[str, Any] = {"limit": page_limit, "offset": page_offset}
            if kernel_id is not None:
                page["kernel_id"] = kernel_id
            return _ALIASES.validate_json(self._request("GET", "/aliases", params=page).content)

        return self._pages(fetch, limit, offset)

    def resolve_kernel(self, name: str) -> str:
        """The kernel id ``name`` stands for (asked of the service unless it is an id)."""
        if _KERNEL_ID.fullmatch(check_kernel_name(name)):
            return name
        response = self._request("GET", "/resolve", params={"name": name})
        kernel_id = ResolvedName.model_validate_json(response.content).kernel_id
        logger.info("kernel name %r resolved to %s by %s", name, kernel_id, self.url)
        return kernel_id

    # Compile jobs -------------------------------------------------------------------------

    def enqueue_job(
        self, blueprint_id: str, target: KernelTarget, *, init_seed: int = 0
    ) -> CompileJob:
        """Queue a compile job (or get the equal pending one)."""
        check_content_id(blueprint_id, what="blueprint id")
        body = _body(JobRequest, blueprint_id=blueprint_id, target=target, init_seed=init_seed)
        response = self._request("POST", "/jobs", json=body)
        return CompileJob.model_validate_json(response.content)

    def claim_job(
        self, worker_id: str, *, lease_seconds: float = DEFAULT_LEASE_SECONDS
    ) -> CompileJob | None:
        """Claim the oldest claimable job, or return ``None``."""
        body = _body(ClaimRequest, worker_id=worker_id, lease_seconds=lease_seconds)
        response = self._request("POST", "/jobs/claim", json=body)
        return _MAYBE_JOB.validate_json(response.content)

    def renew_lease(
        self, job_id: str, worker_id: str, *, lease_seconds: float = DEFAULT_LEASE_SECONDS
    ) -> CompileJob:
        """Extend the lease of a job that ``worker_id`` holds."""
        check_job_id(job_id)
        body = _body(ClaimRequest, worker_id=worker_id, lease_seconds=lease_seconds)
        response = self._request("POST", f"/jobs/{job_id}/lease", json=body)
        return CompileJob.model_validate_json(response.content)

    def complete_job(self, job_id: str, worker_id: str, kernel_id: str) -> CompileJob:
        """Mark a claimed job SUCCEEDED."""
        check_job_id(job_id)
        body = _body(JobCompletion, worker_id=worker_id, kernel_id=check_content_id(kernel_id))
        response = self._request("POST", f"/jobs/{job_id}/complete", json=body)
        return CompileJob.model_validate_json(response.content)

    def fail_job(self, job_id: str, worker_id: str, error: str) -> CompileJob:
        """Mark a claimed job FAILED."""
        check_job_id(job_id)
        body = _body(JobFailure, worker_id=worker_id, error=text_within_bounds(str(error)))
        response = self._request("POST", f"/jobs/{job_id}/fail", json=body)
        return CompileJob.model_validate_json(response.content)

    def get_job(self, job_id: str) -> CompileJob:
        """One compile job."""
        check_job_id(job_id)
        response = self._request("GET", f"/jobs/{job_id}")
        return CompileJob.model_validate_json(response.content)

    def list_jobs(
        self,
        status: CompileJobStatus | None = None,
        *,
        blueprint_id: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[CompileJob]:
        """Compile jobs, oldest first (one page, or all)."""
        params: dict[str, str | int] = {}
        if status is not None:
            params["status"] = CompileJobStatus(status).value
        if blueprint_id is not None:
            params["blueprint_id"] = check_content_id(blueprint_id, what="blueprint id")

        def fetch(page_limit: int, page_offset: int) -> list[CompileJob]:
            page = {**params, "limit": page_limit, "offset": page_offset}
            response = self._request("GET", "/jobs", params=page)
            return _JOBS.validate_json(response.content)

        return self._pages(fetch, limit, offset)

    # Library ------------------------------------------------------------------------------

    def stats(self) -> LibraryStats:
        """Counts of what the library holds."""
        return LibraryStats.model_validate_json(self._request("GET", "/stats").content)

    def close(self) -> None:
        """Close the connection pool (unless the client was given)."""
        if self._owns_client:
            self._client.close()
