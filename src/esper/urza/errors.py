"""Urza's errors: the library-specific subclasses of :class:`esper.errors.EsperError`.

Errors shared with other components (a missing kernel, a digest mismatch, a bad setting) come from
:mod:`esper.errors`; the ones below only make sense for the artifact library. The HTTP service
sends an error's class name with its message, and :class:`~esper.urza.http_client.HttpUrza`
raises the same class again on the client side (see :data:`WIRE_ERRORS`).
"""

from __future__ import annotations

from esper.errors import (
    ArtifactIntegrityError,
    BlueprintError,
    ConfigurationError,
    EsperError,
    KernelNotFoundError,
)


class BlueprintNotFoundError(EsperError, LookupError):
    """No blueprint with the requested id was submitted to the library."""


class JobNotFoundError(EsperError, LookupError):
    """No compile job with the requested id exists in the library."""


class JobStateError(EsperError):
    """A compile job is not in a state that allows the request (e.g. claimed by another worker)."""


class LibraryUnavailableError(EsperError, ConnectionError):
    """The artifact library could not be reached (service down, wrong URL, network failure)."""


class AuthenticationError(EsperError, PermissionError):
    """The Urza service rejected the request's bearer token (missing or wrong)."""


WIRE_ERRORS: dict[str, type[EsperError]] = {
    cls.__name__: cls
    for cls in (
        ArtifactIntegrityError,
        BlueprintError,
        BlueprintNotFoundError,
        ConfigurationError,
        JobNotFoundError,
        JobStateError,
        KernelNotFoundError,
    )
}
"""Errors the service reports by name so that the client can raise the same class."""
