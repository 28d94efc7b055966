"""Resource limits of the Urza service: request bodies, kernel uploads, uploads at once.

- JSON bodies (every route but a kernel upload) are read by :class:`LimitRequestBodies` before
  the app sees them, and refused with 413 past ``max_request_bytes``.
- A kernel upload streams into a temporary file (:func:`spool_upload`: memory up to 1 MiB, disk
  beyond), never longer than its metadata's ``size_bytes``, which is itself at most
  ``max_artifact_bytes``; the library checks and stores it from that file.
- At most ``max_concurrent_uploads`` uploads are in progress (:class:`UploadSlots`); one more is
  answered 503, which clients treat as "busy, retry".

A request refused before its body was read has that body drained (up to :data:`DRAIN_BYTES`) so
the client, still sending, gets to read the answer and the connection stays open.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from typing import IO

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from esper.contracts import KernelMetadata
from esper.errors import ArtifactIntegrityError, ConfigurationError
from esper.urza.api_models import ErrorBody
from esper.urza.errors import LibraryBusyError
from esper.urza.service_errors import HttpError

SPOOL_MEMORY_BYTES = 1024 * 1024
"""Uploads up to this size stay in memory; larger ones are spooled to a temporary file."""

DRAIN_BYTES = 64 * 1024 * 1024
"""Most bytes of a refused request's body read (and dropped) so its client sees the answer."""


def is_kernel_upload(scope: Scope) -> bool:
    """Whether a request is ``PUT /kernels/{kernel_id}`` (streamed, with its own limits)."""
    return bool(scope["method"] == "PUT" and str(scope["path"]).startswith("/kernels/"))


def _declared_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def drain_body(receive: Receive, *, limit: int = DRAIN_BYTES) -> bool:
    """Read and drop a request's body; ``False`` when it is longer than ``limit`` (then the
    connection cannot be reused)."""
    drained = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return False
        drained += len(message.get("body", b""))
        if drained > limit:
            return False
        if not message.get("more_body", False):
            return True


class LimitRequestBodies:
    """ASGI middleware: read each JSON request body whole (at most ``max_bytes``) before the app.

    Args:
        app: the app.
        max_bytes: largest body accepted; a larger one is answered 413.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_kernel_upload(scope):
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send, reusable=await drain_body(receive))
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                reusable = not message.get("more_body", False) or await drain_body(receive)
                await self._refuse(scope, receive, send, reusable=reusable)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, *, reusable: bool) -> None:
        body = ErrorBody(
            error=ConfigurationError.__name__,
            detail=f"the request body is larger than this service accepts ({self.max_bytes} "
            "bytes, max_request_bytes); send a smaller request.",
        )
        headers = None if reusable else {"Connection": "close"}
        await JSONResponse(body.model_dump(), status_code=413, headers=headers)(
            scope, receive, send
        )


class UploadSlots:
    """Counts uploads in progress, at most ``limit`` at once.

    Used from the event loop only (checked, entered and left in async route code, with no
    ``await`` between the check and the entry), so a plain counter is enough.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0

    def refusal(self) -> HttpError | None:
        """The 503 to answer when every slot is taken, else ``None``."""
        if self.in_use < self.limit:
            return None
        return HttpError(
            503,
            LibraryBusyError.__name__,
            f"the Urza service is receiving {self.in_use} uploads already (at most {self.limit} "
            "at once, max_concurrent_uploads); retry shortly.",
        )

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """One upload slot for the ``with`` block (check :meth:`refusal` first)."""
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1


async def drain_request(request: Request, *, limit: int = DRAIN_BYTES) -> None:
    """Read and drop what is left of a request's body (at most ``limit`` bytes)."""
    drained = 0
    async for part in request.stream():
        drained += len(part)
        if drained > limit:
            return


async def spool_upload(request: Request, metadata: KernelMetadata) -> IO[bytes]:
    """Stream an upload's body into a temporary file (positioned at its start).

    Raises:
        HttpError: 422 when the body is longer than ``metadata.size_bytes`` (nothing stored).
    """
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)  # noqa: SIM115
    received = 0
    try:
        async for part in request.stream():
            received += len(part)
            if received > metadata.size_bytes:
                await drain_request(request)
                raise HttpError(
                    422,
                    ArtifactIntegrityError.__name__,
                    f"kernel {metadata.kernel_id}: the body is longer than the metadata's "
                    f"size_bytes={metadata.size_bytes}; nothing was stored.",
                )
            spool.write(part)
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool
