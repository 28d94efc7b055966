"""Esper's exception hierarchy: every error says what was wrong, what was expected, and what to do.

All errors derive from :class:`EsperError`. Where a built-in exception type describes the same
failure (a bad value, a missing key, an index out of range), the Esper error also derives from it,
so ``except ValueError`` keeps working for callers that do not know about Esper.
"""

from __future__ import annotations


class EsperError(Exception):
    """Base class of every error raised by Esper."""


class ConfigurationError(EsperError, ValueError):
    """A user-supplied setting or argument is invalid (wrong type, out of range, inconsistent)."""


class ArgumentTypeError(ConfigurationError, TypeError):
    """An argument has the wrong type (e.g. ``seeds_per_layer="3"``); nothing was changed."""


class UnknownLayerError(EsperError, LookupError):
    """A layer name does not name a wrapped layer of the model."""


class SeedIndexError(EsperError, IndexError):
    """A seed index is outside ``range(seeds_per_layer)``."""


class IllegalTransitionError(EsperError):
    """A seed lifecycle transition that the transition table does not allow; nothing was changed."""


class BlueprintError(EsperError, ValueError):
    """A blueprint spec is unknown, malformed, or incompatible with its target layer."""


class ArtifactFormatError(EsperError, ValueError):
    """Kernel artifact bytes are not a well-formed Esper kernel artifact."""


class ArtifactIntegrityError(EsperError):
    """Kernel artifact bytes do not match their content address (sha256 digest mismatch)."""


class KernelNotFoundError(EsperError, LookupError):
    """No artifact with the requested kernel id exists in the artifact source."""


class AmbiguousKernelNameError(EsperError, LookupError):
    """A kernel name (an id prefix) matches more than one kernel; give more of the id."""


class KernelLoadError(EsperError):
    """A kernel could not be fetched, verified or built; the seed was returned to DORMANT."""


class KernelShapeMismatchError(EsperError, ValueError):
    """A kernel was built for a different layer shape than the seed it was loaded into."""


class StateDictError(EsperError, ValueError):
    """A state dict does not describe a valid morphed model (a seed's state, spec or kernel
    tensors are malformed or do not fit its layer); nothing was loaded."""
