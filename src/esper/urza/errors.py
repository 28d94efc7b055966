"""Urza's errors: the library-specific subclasses of :class:`esper.errors.EsperError`.

Errors shared with other components (a missing kernel, a digest mismatch, a bad setting) come from
:mod:`esper.errors`; the ones below only make sense for the artifact library. The HTTP service
sends an error's class name with its message, and :class:`~esper.urza.http_client.HttpUrza`
raises the same class again on the client side (see :data:`WIRE_ERRORS`).
"""

from __future__ import annotations

from esper.errors import (
    AmbiguousKernelNameError,
    ArtifactFormatError,
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


class AliasConflictError(EsperError):
    """An alias already names another kernel; moving it must be asked for (``move=True``)."""


class JobStateError(EsperError):
    """A compile job is not in a state that allows the request (e.g. claimed by another worker)."""


class LibraryUnavailableError(EsperError, ConnectionError):
    """The artifact library could not be reached (service down, wrong URL, network failure)."""


class AuthenticationError(EsperError, PermissionError):
    """The Urza service rejected the request's bearer token (missing or wrong)."""


class LibraryBusyError(LibraryUnavailableError):
    """The Urza service is at its limit of concurrent uploads; the same request may succeed later."""


class ArtifactRefusedError(EsperError, ValueError):
    """The library refused to store a kernel artifact; putting the same bytes again cannot succeed."""


class KernelMetadataMismatchError(ArtifactRefusedError):
    """A kernel's metadata claims something its artifact's bytes contradict (blueprint, target,
    init seed, parameter count, dtype, payload checksum)."""


class ArtifactTooLargeError(ArtifactRefusedError):
    """A kernel artifact is larger than the library (the service) accepts."""


class JobRefusedError(EsperError, ValueError):
    """A compile job was refused at submission: its kernel would exceed the library's limits."""


ARTIFACT_REFUSALS: tuple[type[EsperError], ...] = (
    ArtifactRefusedError,
    ArtifactFormatError,
    ArtifactIntegrityError,
    ConfigurationError,
)
"""What ``put_kernel`` raises when it refuses an artifact for good (as opposed to
:class:`LibraryUnavailableError`, which says to try again): bytes that are not a kernel artifact,
that do not match their id or size, metadata that does not describe them, or an artifact over the
service's size limit. A compile worker fails the job with the reason instead of recompiling."""


WIRE_ERRORS: dict[str, type[EsperError]] = {
    cls.__name__: cls
    for cls in (
        AliasConflictError,
        AmbiguousKernelNameError,
        ArtifactFormatError,
        ArtifactIntegrityError,
        ArtifactTooLargeError,
        BlueprintError,
        BlueprintNotFoundError,
        ConfigurationError,
        JobNotFoundError,
        JobRefusedError,
        JobStateError,
        KernelMetadataMismatchError,
        KernelNotFoundError,
        LibraryBusyError,
    )
}
"""Errors the service reports by name so that the client can raise the same class."""
