"""The Urza HTTP service: the artifact library shared over HTTP (FastAPI app, run by uvicorn).

Every route except ``GET /healthz`` requires ``Authorization: Bearer <token>`` (401 otherwise),
the OpenAPI schema included (``GET /openapi.json``). Ids in paths and bodies are checked against
their forms (sha256 hex, 32-hex job ids) before anything else sees them, so traversal-style
values are answered with 422. Kernel downloads are streamed. Errors come back as
``{"error": <class name>, "detail": <message>}`` so that
:class:`~esper.urza.http_client.HttpUrza` raises the same exception the library raised.

Run it with ``esper urza serve --host 127.0.0.1 --port 8765`` (URLs, token and limits from the
environment, see :class:`~esper.urza.settings.UrzaSettings`) or call :func:`serve`. Uploads,
request bodies and kernel sizes are bounded (:mod:`esper.urza.service_limits`,
:mod:`esper.urza.admission`); errors never show where the library's storage is
(:mod:`esper.urza.service_errors`).
FastAPI and uvicorn are imported with this module, never by ``import esper.urza``.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable, Iterator
from typing import IO, Annotated

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from esper.contracts import (
    BlueprintRecord,
    BlueprintStatus,
    CompileJob,
    CompileJobStatus,
    KernelMetadata,
    LibraryStats,
)
from esper.errors import ArtifactIntegrityError, ConfigurationError, EsperError
from esper.urza.admission import Admission, BlueprintCatalog
from esper.urza.api_models import (
    KERNEL_ID_HEADER,
    METADATA_HEADER,
    TOKEN_ENV,
    BlueprintStatusChange,
    BlueprintSubmission,
    ClaimRequest,
    JobCompletion,
    JobFailure,
    JobRequest,
    KernelQuery,
    PageLimit,
    PageOffset,
    decode_metadata_header,
)
from esper.urza.errors import ArtifactTooLargeError
from esper.urza.library import ArtifactLibrary
from esper.urza.pagination import MAX_PAGE_SIZE
from esper.urza.service_aliases import add_alias_routes
from esper.urza.service_auth import RequireBearerToken, require_token
from esper.urza.service_errors import (
    AnswerUnexpectedErrors,
    HttpError,
    Redactor,
    answer_library_error,
)
from esper.urza.service_limits import (
    LimitRequestBodies,
    UploadSlots,
    drain_request,
    spool_upload,
)
from esper.urza.settings import ServiceLimits, UrzaSettings

logger = logging.getLogger(__name__)

_SHA256 = r"^[0-9a-f]{64}$"
_JOB = r"^[0-9a-f]{32}$"
KernelIdPath = Annotated[str, Path(pattern=_SHA256, description="sha256 hex of the artifact")]
BlueprintIdPath = Annotated[str, Path(pattern=_SHA256, description="sha256 hex of the spec")]
JobIdPath = Annotated[str, Path(pattern=_JOB, description="32 hex digits")]
Limit = Annotated[PageLimit, Query(description=f"rows in the page (at most {MAX_PAGE_SIZE})")]
Offset = Annotated[PageOffset, Query(description="rows skipped before the page")]


def _package_version() -> str:
    try:
        return importlib.metadata.version("esper-morphogenetic")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _guarded(chunks: Iterator[bytes], kernel_id: str) -> Iterator[bytes]:
    """Stream chunks; a digest mismatch found at the end is logged (the client checks too)."""
    try:
        yield from chunks
    except ArtifactIntegrityError:
        logger.exception(
            "served corrupted bytes for kernel %s; the client will reject them", kernel_id
        )


def _file_store(library: ArtifactLibrary) -> Callable[[IO[bytes], KernelMetadata], KernelMetadata]:
    """How to store a spooled upload: from the file when the library can, else from its bytes."""
    put_file = getattr(library, "put_kernel_file", None)
    if callable(put_file):
        return put_file
    return lambda file, metadata: library.put_kernel(file.read(), metadata)


def _storage_locations(library: ArtifactLibrary) -> tuple[str, ...]:
    locations = getattr(library, "locations", None)
    return tuple(locations()) if callable(locations) else ()


def create_app(
    library: ArtifactLibrary,
    token: str,
    *,
    limits: ServiceLimits | None = None,
    catalog: BlueprintCatalog | None = None,
) -> FastAPI:
    """The FastAPI app that serves ``library`` to holders of ``token``.

    Args:
        library: the library to expose (normally a storage-backed one over PostgreSQL and S3).
        token: the bearer token every request (except ``/healthz``) must carry.
        limits: sizes of uploads and requests, uploads at once, kernel sizes (defaults of
            :class:`~esper.urza.settings.ServiceLimits` when ``None``).
        catalog: the blueprint families submissions are checked against (see
            :mod:`esper.urza.admission`); ``None``: contracts only.

    Raises:
        ConfigurationError: when ``token`` is empty.
    """
    if not token:
        raise ConfigurationError(
            f"the Urza service needs a bearer token; set {TOKEN_ENV} (any long random string, "
            "e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)."
        )
    limits = limits or ServiceLimits()
    admission = Admission(limits, catalog)
    uploads = UploadSlots(limits.max_concurrent_uploads)
    redact = Redactor(_storage_locations(library))
    store_file = _file_store(library)
    app = FastAPI(
        title="Urza",
        summary="Esper's artifact library: blueprints, compiled kernels and compile jobs.",
        version=_package_version(),
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.urza_token = token.encode()
    # Outermost last: unexpected errors, then the token, then body sizes, then the routes.
    app.add_middleware(LimitRequestBodies, max_bytes=limits.max_request_bytes)
    app.add_middleware(RequireBearerToken, token=token.encode())
    app.add_middleware(AnswerUnexpectedErrors)
    authorized = [Depends(require_token)]

    @app.exception_handler(HttpError)
    async def _answer_http_error(_request: Request, error: HttpError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status_code == 401 else None
        body = error.body.model_copy(update={"detail": redact(error.body.detail)})
        return JSONResponse(body.model_dump(), status_code=error.status_code, headers=headers)

    @app.exception_handler(EsperError)
    async def _answer_library_error(request: Request, error: EsperError) -> JSONResponse:
        return answer_library_error(error, request.method, request.url.path, redact)

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict[str, str]:
        """Liveness probe (no token needed)."""
        return {"status": "ok"}

    @app.get("/openapi.json", tags=["service"], dependencies=authorized, include_in_schema=False)
    def openapi() -> JSONResponse:
        """The OpenAPI schema of this service."""
        return JSONResponse(app.openapi())

    @app.get("/limits", tags=["service"], dependencies=authorized)
    def get_limits() -> ServiceLimits:
        """What this service accepts (clients check uploads against it before sending them)."""
        return limits

    # Blueprints ---------------------------------------------------------------------------

    @app.post("/blueprints", tags=["blueprints"], dependencies=authorized)
    def submit_blueprint(body: BlueprintSubmission) -> BlueprintRecord:
        """Store a blueprint under its content id (idempotent) if the catalog accepts it."""
        admission.check_blueprint(body.spec)
        return library.submit_blueprint(body.spec, name=body.name)

    @app.get("/blueprints", tags=["blueprints"], dependencies=authorized)
    def list_blueprints(
        status: BlueprintStatus | None = None, limit: Limit = MAX_PAGE_SIZE, offset: Offset = 0
    ) -> list[BlueprintRecord]:
        """Blueprints, oldest first (one page)."""
        return library.list_blueprints(status, limit=limit, offset=offset)

    @app.put("/blueprints/{blueprint_id:path}/status", tags=["blueprints"], dependencies=authorized)
    def set_blueprint_status(
        blueprint_id: BlueprintIdPath, body: BlueprintStatusChange
    ) -> BlueprintRecord:
        """Change a blueprint's status."""
        return library.set_blueprint_status(blueprint_id, body.status, body.reason)

    @app.get("/blueprints/{blueprint_id:path}", tags=["blueprints"], dependencies=authorized)
    def get_blueprint(blueprint_id: BlueprintIdPath) -> BlueprintRecord:
        """One blueprint."""
        return library.get_blueprint(blueprint_id)

    # Kernels ------------------------------------------------------------------------------

    @app.post("/kernels/search", tags=["kernels"], dependencies=authorized)
    def find_kernels(body: KernelQuery) -> list[KernelMetadata]:
        """Kernels matching every given filter, oldest first (one page)."""
        return library.find_kernels(
            blueprint_id=body.blueprint_id,
            target=body.target,
            device=body.device,
            dtype=body.dtype,
            init_seed=body.init_seed,
            limit=body.limit,
            offset=body.offset,
        )

    @app.get("/kernels/{kernel_id:path}/metadata", tags=["kernels"], dependencies=authorized)
    def get_kernel_metadata(kernel_id: KernelIdPath) -> KernelMetadata:
        """The metadata stored with a kernel."""
        return library.get_kernel_metadata(kernel_id)

    def upload_problem(kernel_id: str, header: str, declared: str | None) -> HttpError | None:
        """Why an upload is refused before its body is read, or ``None``."""
        try:
            metadata = decode_metadata_header(header)
        except (ValueError, ValidationError) as error:
            return HttpError(422, ConfigurationError.__name__, f"{METADATA_HEADER}: {error}")
        if metadata.kernel_id != kernel_id:
            return HttpError(
                422,
                ConfigurationError.__name__,
                f"the path names kernel {kernel_id} but the metadata names {metadata.kernel_id}.",
            )
        if metadata.size_bytes > limits.max_artifact_bytes:
            return HttpError(
                413,
                ArtifactTooLargeError.__name__,
                f"kernel {kernel_id} is {metadata.size_bytes} bytes; this service accepts at "
                f"most {limits.max_artifact_bytes} (max_artifact_bytes).",
            )
        most = limits.max_kernel_parameters
        if most is not None and metadata.parameter_count > most:
            return HttpError(
                413,
                ArtifactTooLargeError.__name__,
                f"kernel {kernel_id} has {metadata.parameter_count} parameters; this service "
                f"accepts at most {most} (max_kernel_parameters).",
            )
        if declared is not None and declared.isdigit() and int(declared) != metadata.size_bytes:
            return HttpError(
                422,
                ArtifactIntegrityError.__name__,
                f"kernel {kernel_id}: the body is {declared} bytes but the metadata's "
                f"size_bytes={metadata.size_bytes}; nothing was stored.",
            )
        return None

    @app.put(
        "/kernels/{kernel_id:path}",
        tags=["kernels"],
        dependencies=authorized,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        },
    )
    async def put_kernel(
        kernel_id: KernelIdPath,
        request: Request,
        metadata_header: Annotated[
            str,
            Header(alias=METADATA_HEADER, description="KernelMetadata JSON, base64url-encoded"),
        ],
    ) -> KernelMetadata:
        """Upload an artifact (raw body, streamed to a temporary file) with its metadata."""
        declared = request.headers.get("content-length")
        problem = upload_problem(kernel_id, metadata_header, declared) or uploads.refusal()
        if problem is not None:
            await drain_request(request)
            raise problem
        metadata = decode_metadata_header(metadata_header)
        with uploads.hold():
            spool = await spool_upload(request, metadata)
            try:
                return await run_in_threadpool(store_file, spool, metadata)
            finally:
                spool.close()

    @app.get(
        "/kernels/{kernel_id:path}",
        tags=["kernels"],
        dependencies=authorized,
        response_class=StreamingResponse,
        responses={200: {"content": {"application/octet-stream": {}}}},
    )
    def get_kernel(kernel_id: KernelIdPath) -> StreamingResponse:
        """Stream an artifact's bytes (the client checks them against the id)."""
        chunks = library.iter_kernel_chunks(kernel_id)
        return StreamingResponse(
            _guarded(chunks, kernel_id),
            media_type="application/octet-stream",
            headers={KERNEL_ID_HEADER: kernel_id},
        )

    # Compile jobs -------------------------------------------------------------------------

    @app.post("/jobs", tags=["jobs"], dependencies=authorized)
    def enqueue_job(body: JobRequest) -> CompileJob:
        """Queue a compile job (or return the equal pending one) if its kernel fits the limits."""
        admission.check_job(library.get_blueprint(body.blueprint_id).spec, body.target)
        return library.enqueue_job(body.blueprint_id, body.target, init_seed=body.init_seed)

    @app.get("/jobs", tags=["jobs"], dependencies=authorized)
    def list_jobs(
        status: CompileJobStatus | None = None,
        blueprint_id: Annotated[str | None, Query(pattern=_SHA256)] = None,
        limit: Limit = MAX_PAGE_SIZE,
        offset: Offset = 0,
    ) -> list[CompileJob]:
        """Compile jobs, oldest first (one page)."""
        return library.list_jobs(status, blueprint_id=blueprint_id, limit=limit, offset=offset)

    @app.post("/jobs/claim", tags=["jobs"], dependencies=authorized)
    def claim_job(body: ClaimRequest) -> CompileJob | None:
        """Claim the oldest claimable job, or ``null`` when there is none."""
        return library.claim_job(body.worker_id, lease_seconds=body.lease_seconds)

    @app.post("/jobs/{job_id:path}/lease", tags=["jobs"], dependencies=authorized)
    def renew_lease(job_id: JobIdPath, body: ClaimRequest) -> CompileJob:
        """Extend the lease of a job the worker holds."""
        return library.renew_lease(job_id, body.worker_id, lease_seconds=body.lease_seconds)

    @app.post("/jobs/{job_id:path}/complete", tags=["jobs"], dependencies=authorized)
    def complete_job(job_id: JobIdPath, body: JobCompletion) -> CompileJob:
        """Mark a claimed job SUCCEEDED."""
        return library.complete_job(job_id, body.worker_id, body.kernel_id)

    @app.post("/jobs/{job_id:path}/fail", tags=["jobs"], dependencies=authorized)
    def fail_job(job_id: JobIdPath, body: JobFailure) -> CompileJob:
        """Mark a claimed job FAILED."""
        return library.fail_job(job_id, body.worker_id, body.error)

    @app.get("/jobs/{job_id:path}", tags=["jobs"], dependencies=authorized)
    def get_job(job_id: JobIdPath) -> CompileJob:
        """One compile job."""
        return library.get_job(job_id)

    # Library ------------------------------------------------------------------------------

    @app.get("/stats", tags=["library"], dependencies=authorized)
    def stats() -> LibraryStats:
        """Counts of what the library holds."""
        return library.stats()

    add_alias_routes(app, library, authorized)  # kernel names: /aliases, /resolve
    return app


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    library: ArtifactLibrary | None = None,
    token: str | None = None,
    settings: UrzaSettings | None = None,
    catalog: BlueprintCatalog | None = None,
    log_level: str = "info",
) -> None:
    """Run the service until interrupted (blocking).

    Args:
        host: interface to listen on (``0.0.0.0`` for every interface).
        port: TCP port.
        library: the library to serve; opened from ``settings`` (metadata and blob URLs) when
            ``None``, and closed when the server stops.
        token: the bearer token; ``settings.token`` (``ESPER_URZA_TOKEN``) when ``None``.
        settings: URLs, token and limits; read from the environment when ``None``.
        catalog: the blueprint families submissions are checked against (``esper urza serve``
            gives the built-in ones); ``None``: contracts only, with a warning.
        log_level: uvicorn's log level.
    """
    import uvicorn

    from esper.urza.factory import open_storage_library

    settings = settings or UrzaSettings.from_env()
    token = token or (settings.token.get_secret_value() if settings.token else "")
    if catalog is None:
        logger.warning(
            "no blueprint catalog: submitted blueprints and compile jobs are checked as "
            "contracts only (start the service with `esper urza serve` to check them against "
            "the blueprint registry and the kernel size limits)"
        )
    owned = library is None
    served = library or open_storage_library(
        metadata_url=settings.metadata_url, blob_url=settings.blob_url, run_dir=settings.run_dir
    )
    try:
        app = create_app(served, token, limits=settings.limits, catalog=catalog)
        logger.info("Urza service on http://%s:%d serving %r", host, port, served)
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        if owned:
            served.close()
