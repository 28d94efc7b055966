"""Bearer-token authentication of the Urza service: every route but ``/healthz`` needs the token.

The check runs twice on purpose: an ASGI middleware answers 401 before routing, so no
unauthenticated request gets further (not even to a 404, a 405, a body-size check or a
body-parsing error), and a route dependency declares the scheme in the OpenAPI schema.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from esper.urza.api_models import TOKEN_ENV, ErrorBody
from esper.urza.errors import AuthenticationError
from esper.urza.service_errors import HttpError

OPEN_PATHS = frozenset({"/healthz"})
"""Paths that need no token."""

_bearer = HTTPBearer(auto_error=False, description=f"the service's token ({TOKEN_ENV})")


def token_problem(authorization: str | None, expected: bytes) -> str | None:
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


class RequireBearerToken:
    """ASGI middleware: answer 401 before routing unless the request carries the token."""

    def __init__(self, app: ASGIApp, *, token: bytes) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        problem = token_problem(None if header is None else header.decode("latin-1"), self.token)
        if problem is None:
            await self.app(scope, receive, send)
        else:
            await _unauthorized(problem)(scope, receive, send)


def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Route dependency that declares the bearer scheme in the OpenAPI schema (and checks it)."""
    problem = token_problem(request.headers.get("authorization"), request.app.state.urza_token)
    if problem is not None:
        raise HttpError(401, AuthenticationError.__name__, problem)
