"""The Urza HTTP service: the artifact library shared over HTTP (FastAPI app, run by uvicorn).

Every route except ``GET /healthz`` requires ``Authorization: Bearer <token>`` (401 otherwise),
the OpenAPI schema included (``GET /openapi.json``). Ids in paths and bodies are checked against
their forms (sha256 hex, 32-hex job ids) before anything else sees them, so traversal-style
values are answered with 422. Kernel downloads are streamed. Errors come back as
``{"error": <class name>, "detail": <message>}`` so that
:class:`~esper.urza.http_client.HttpUrza` raises the same exception the library raised.

Run it with ``python -m esper.urza --host 127.0.0.1 --port 8765`` (URLs and token from the
environment, see :class:`~esper.urza.settings.UrzaSettings`) or call :func:`serve`.
FastAPI and uvicorn are imported with this module, never by ``import esper.urza``.
"""

from __future__ import annotations

import hmac
import importlib.metadata
import logging
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from esper.contracts import (
    BlueprintRecord,
    BlueprintStatus,
    CompileJob,
    CompileJobStatus,
    KernelMetadata,
    LibraryStats,
)
from esper.errors import ArtifactIntegrityError, ConfigurationError, EsperError, KernelNotFoundError
from esper.urza.api_models import (
    KERNEL_ID_HEADER,
    METADATA_HEADER,
    TOKEN_ENV,
    BlueprintStatusChange,
    BlueprintSubmission,
    ClaimRequest,
    ErrorBody,
    JobCompletion,
    JobFailure,
    JobRequest,
    KernelQuery,
    decode_metadata_header,
)
from esper.urza.errors import (
    AuthenticationError,
    BlueprintNotFoundError,
    JobNotFoundError,
    JobStateError,
)
from esper.urza.library import ArtifactLibrary
from esper.urza.settings import UrzaSettings

logger = logging.getLogger(__name__)

DEFAULT_MAX_ARTIFACT_BYTES = 512 * 1024 * 1024
"""Largest kernel upload the service accepts by default."""

_SHA256 = r"^[0-9a-f]{64}$"
_JOB = r"^[0-9a-f]{32}$"
KernelIdPath = Annotated[str, Path(pattern=_SHA256, description="sha256 hex of the artifact")]
BlueprintIdPath = Annotated[str, Path(pattern=_SHA256, description="sha256 hex of the spec")]
JobIdPath = Annotated[str, Path(pattern=_JOB, description="32 hex digits")]

_STATUS_OF_ERROR: dict[type[EsperError], int] = {
    KernelNotFoundError: 404,
    BlueprintNotFoundError: 404,
    JobNotFoundError: 404,
    JobStateError: 409,
    ConfigurationError: 422,
}


class _HttpError(Exception):
    """An error answered directly by the service (not raised by the library)."""

    def __init__(self, status_code: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.body = ErrorBody(error=error, detail=detail)


def _error_status(error: EsperError, request: Request) -> int:
    if isinstance(error, ArtifactIntegrityError):
        # On an upload the client sent bad bytes; on a read the stored copy is corrupted.
        return 422 if request.method == "PUT" else 500
    for cls, status in _STATUS_OF_ERROR.items():
        if isinstance(error, cls):
            return status
    return 500


_bearer = HTTPBearer(auto_error=False, description=f"the service's token ({TOKEN_ENV})")
_OPEN_PATHS = frozenset({"/healthz"})


def _token_problem(authorization: str | None, expected: bytes) -> str | None:
    """Why an ``Authorization`` header value does not grant access, or ``None`` when it does."""
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not credentials:
        return (
            f"missing 'Authorization: Bearer <token>' header; set {TOKEN_ENV} to the service's "
            "token."
        )
    if not hmac.compare_digest(credentials.strip().encode(), expected):
        return f"wrong bearer token; set {TOKEN_ENV} to the token the service was started with."
    return None


def _unauthorized(detail: str) -> JSONResponse:
    body = ErrorBody(error=AuthenticationError.__name__, detail=detail)
    return JSONResponse(body.model_dump(), status_code=401, headers={"WWW-Authenticate": "Bearer"})


class _RequireBearerToken:
    """ASGI middleware: answer 401 before routing, so no unauthenticated request gets further
    (not even to a 404, 405 or a body-parsing error)."""

    def __init__(self, app: ASGIApp, *, token: bytes) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        problem = _token_problem(None if header is None else header.decode("latin-1"), self.token)
        if problem is None:
            await self.app(scope, receive, send)
        else:
            await _unauthorized(problem)(scope, receive, send)


def _require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Route dependency that declares the bearer scheme in the OpenAPI schema (and checks it)."""
    problem = _token_problem(request.headers.get("authorization"), request.app.state.urza_token)
    if problem is not None:
        raise _HttpError(401, AuthenticationError.__name__, problem)


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


def create_app(
    library: ArtifactLibrary,
    token: str,
    *,
    max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
) -> FastAPI:
    """The FastAPI app that serves ``library`` to holders of ``token``.

    Args:
        library: the library to expose (normally a storage-backed one over PostgreSQL and S3).
        token: the bearer token every request (except ``/healthz``) must carry.
        max_artifact_bytes: uploads larger than this are refused with 413.

    Raises:
        ConfigurationError: when ``token`` is empty.
    """
    if not token:
        raise ConfigurationError(
            f"the Urza service needs a bearer token; set {TOKEN_ENV} (any long random string, "
            "e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)."
        )
    app = FastAPI(
        title="Urza",
        summary="Esper's artifact library: blueprints, compiled kernels and compile jobs.",
        version=_package_version(),
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.urza_token = token.encode()
    app.add_middleware(_RequireBearerToken, token=token.encode())
    authorized = [Depends(_require_token)]

    @app.exception_handler(_HttpError)
    async def _answer_http_error(_request: Request, error: _HttpError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status_code == 401 else None
        return JSONResponse(error.body.model_dump(), status_code=error.status_code, headers=headers)

    @app.exception_handler(EsperError)
    async def _answer_library_error(request: Request, error: EsperError) -> JSONResponse:
        status = _error_status(error, request)
        if status >= 500:
            logger.error("%s %s failed: %s", request.method, request.url.path, error)
        body = ErrorBody(error=type(error).__name__, detail=str(error))
        return JSONResponse(body.model_dump(), status_code=status)

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict[str, str]:
        """Liveness probe (no token needed)."""
        return {"status": "ok"}

    @app.get("/openapi.json", tags=["service"], dependencies=authorized, include_in_schema=False)
    def openapi() -> JSONResponse:
        """The OpenAPI schema of this service."""
        return JSONResponse(app.openapi())

    # Blueprints ---------------------------------------------------------------------------

    @app.post("/blueprints", tags=["blueprints"], dependencies=authorized)
    def submit_blueprint(body: BlueprintSubmission) -> BlueprintRecord:
        """Store a blueprint under its content id (idempotent)."""
        return library.submit_blueprint(body.spec, name=body.name)

    @app.get("/blueprints", tags=["blueprints"], dependencies=authorized)
    def list_blueprints(status: BlueprintStatus | None = None) -> list[BlueprintRecord]:
        """Blueprints, oldest first."""
        return library.list_blueprints(status)

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
        """Kernels matching every given filter, oldest first."""
        return library.find_kernels(
            blueprint_id=body.blueprint_id, target=body.target, device=body.device, dtype=body.dtype
        )

    @app.get("/kernels/{kernel_id:path}/metadata", tags=["kernels"], dependencies=authorized)
    def get_kernel_metadata(kernel_id: KernelIdPath) -> KernelMetadata:
        """The metadata stored with a kernel."""
        return library.get_kernel_metadata(kernel_id)

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
        """Upload an artifact (raw body) with its metadata; idempotent."""
        try:
            metadata = decode_metadata_header(metadata_header)
        except (ValueError, ValidationError) as error:
            raise _HttpError(
                422, ConfigurationError.__name__, f"{METADATA_HEADER}: {error}"
            ) from None
        if metadata.kernel_id != kernel_id:
            raise _HttpError(
                422,
                ConfigurationError.__name__,
                f"the path names kernel {kernel_id} but the metadata names {metadata.kernel_id}.",
            )
        if metadata.size_bytes > max_artifact_bytes:
            raise _HttpError(
                413,
                ConfigurationError.__name__,
                f"kernel {kernel_id} is {metadata.size_bytes} bytes; this service accepts at "
                f"most {max_artifact_bytes}.",
            )
        artifact = bytearray()
        async for part in request.stream():
            artifact += part
            if len(artifact) > metadata.size_bytes:
                raise _HttpError(
                    422,
                    ArtifactIntegrityError.__name__,
                    f"kernel {kernel_id}: the body is longer than the metadata's "
                    f"size_bytes={metadata.size_bytes}; nothing was stored.",
                )
        return await run_in_threadpool(library.put_kernel, bytes(artifact), metadata)

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
        """Queue a compile job (or return the equal pending one)."""
        return library.enqueue_job(body.blueprint_id, body.target, init_seed=body.init_seed)

    @app.get("/jobs", tags=["jobs"], dependencies=authorized)
    def list_jobs(
        status: CompileJobStatus | None = None,
        blueprint_id: Annotated[str | None, Query(pattern=_SHA256)] = None,
    ) -> list[CompileJob]:
        """Compile jobs, oldest first."""
        return library.list_jobs(status, blueprint_id=blueprint_id)

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

    return app


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    library: ArtifactLibrary | None = None,
    token: str | None = None,
    settings: UrzaSettings | None = None,
    log_level: str = "info",
) -> None:
    """Run the service until interrupted (blocking).

    Args:
        host: interface to listen on (``0.0.0.0`` for every interface).
        port: TCP port.
        library: the library to serve; opened from ``settings`` (metadata and blob URLs) when
            ``None``, and closed when the server stops.
        token: the bearer token; ``settings.token`` (``ESPER_URZA_TOKEN``) when ``None``.
        settings: where URLs and token come from; read from the environment when ``None``.
        log_level: uvicorn's log level.
    """
    import uvicorn

    from esper.urza.factory import open_storage_library

    settings = settings or UrzaSettings.from_env()
    token = token or (settings.token.get_secret_value() if settings.token else "")
    owned = library is None
    served = library or open_storage_library(
        metadata_url=settings.metadata_url, blob_url=settings.blob_url, run_dir=settings.run_dir
    )
    try:
        app = create_app(served, token)
        logger.info("Urza service on http://%s:%d serving %r", host, port, served)
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        if owned:
            served.close()
