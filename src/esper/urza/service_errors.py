"""Error answers of the Urza service: status codes, bodies, and what never leaves the service.

Every error is answered as ``{"error": <class name>, "detail": <message>}`` (see
:class:`~esper.urza.api_models.ErrorBody`), with the connection kept open:

- an error the library raised on purpose (an unknown id, a refused artifact) keeps its class
  name and message, with every location of the library's storage (database URL, blob folder,
  bucket) replaced by ``<storage>``;
- a failure of the service itself (its database or blob store failing, a bug) is answered 500
  with a reference to the log line that holds the details, never with the details themselves.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from esper.errors import (
    AmbiguousKernelNameError,
    ArtifactFormatError,
    ArtifactIntegrityError,
    BlueprintError,
    ConfigurationError,
    EsperError,
    KernelNotFoundError,
)
from esper.urza.api_models import ErrorBody
from esper.urza.errors import (
    AliasConflictError,
    ArtifactRefusedError,
    ArtifactTooLargeError,
    BlueprintNotFoundError,
    JobNotFoundError,
    JobRefusedError,
    JobStateError,
    LibraryBusyError,
)

logger = logging.getLogger(__name__)

REDACTED = "<storage>"
"""What an error message shows instead of a location of the library's storage."""

SERVICE_ERROR = "ServiceError"
"""Error name of a 500 answer: the service failed, not the request."""

_STATUS_OF_ERROR: dict[type[EsperError], int] = {
    KernelNotFoundError: 404,
    BlueprintNotFoundError: 404,
    JobNotFoundError: 404,
    JobStateError: 409,
    AliasConflictError: 409,
    AmbiguousKernelNameError: 409,
    ArtifactTooLargeError: 413,
    LibraryBusyError: 503,
    ArtifactRefusedError: 422,
    ArtifactFormatError: 422,
    BlueprintError: 422,
    ConfigurationError: 422,
    JobRefusedError: 422,
}


class HttpError(Exception):
    """An error answered directly by the service (not raised by the library)."""

    def __init__(self, status_code: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.body = ErrorBody(error=error, detail=detail)


def error_status(error: EsperError, method: str) -> int:
    """The HTTP status of a library error raised while answering a ``method`` request."""
    if isinstance(error, ArtifactIntegrityError):
        # On an upload the client sent bad bytes; on a read the stored copy is corrupted.
        return 422 if method == "PUT" else 500
    for cls, status in _STATUS_OF_ERROR.items():
        if isinstance(error, cls):
            return status
    return 500


class Redactor:
    """Replaces the library's storage locations in text that is about to leave the service.

    Args:
        locations: URLs and paths of the library's storage (longest are replaced first, so a
            folder inside another is caught whole).
    """

    def __init__(self, locations: Iterable[str]) -> None:
        self.locations = sorted({x for x in locations if len(x) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        """``text`` without any storage location."""
        for location in self.locations:
            text = text.replace(location, REDACTED)
        return text


def internal_error_body(reference: str) -> ErrorBody:
    """The body of a 500: what failed is in the log line with ``reference``."""
    return ErrorBody(
        error=SERVICE_ERROR,
        detail=f"the Urza service failed to answer this request; its log has the details under "
        f"reference {reference}. Retry later, or ask the service's operator.",
    )


def answer_library_error(
    error: EsperError, method: str, path: str, redact: Redactor
) -> JSONResponse:
    """The answer to a library error: its class and (redacted) message, or a 500 reference."""
    status = error_status(error, method)
    if status >= 500:
        reference = uuid.uuid4().hex[:12]
        logger.error(
            "%s %s failed [%s]: %s: %s", method, path, reference, type(error).__name__, error
        )
        return JSONResponse(internal_error_body(reference).model_dump(), status_code=status)
    body = ErrorBody(error=type(error).__name__, detail=redact(str(error)))
    return JSONResponse(body.model_dump(), status_code=status)


class AnswerUnexpectedErrors:
    """ASGI middleware: a failure nobody handled becomes a 500 with a log reference.

    Starlette's own last-resort handler answers too, but then re-raises, and the server drops
    the connection: a client with a keep-alive connection would see it reset. Here the error is
    logged and answered, and the connection stays usable. A failure after the answer started
    (a download cut off mid-stream) is re-raised: only closing the connection can tell the
    client then.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if started:
                raise
            reference = uuid.uuid4().hex[:12]
            logger.exception("%s %s failed [%s]", scope["method"], scope["path"], reference)
            response = JSONResponse(internal_error_body(reference).model_dump(), status_code=500)
            await response(scope, receive, send)
