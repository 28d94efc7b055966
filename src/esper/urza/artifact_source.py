"""UrzaArtifactSource: the adapter through which the kernel cache fetches artifact bytes.

The execution engine's kernel cache loads kernels off the training thread; it only needs
``fetch(kernel_id) -> bytes``. This adapter provides that on top of any
:class:`~esper.urza.library.ArtifactLibrary`, embedded or remote, so the cache never sees URLs,
databases or HTTP. Every fetch is digest-checked by the library.
"""

from __future__ import annotations

import logging
import time

from esper.urza.library import ArtifactLibrary

logger = logging.getLogger(__name__)


class UrzaArtifactSource:
    """Artifact bytes by kernel id, for the kernel cache (safe to call from any thread).

    Args:
        library: where the artifacts are; the source closes it in :meth:`close` only when
            ``owns_library`` is true.
        owns_library: whether :meth:`close` also closes ``library``.
    """

    def __init__(self, library: ArtifactLibrary, *, owns_library: bool = False) -> None:
        self.library = library
        self._owns_library = owns_library

    def __repr__(self) -> str:
        return f"UrzaArtifactSource({self.library!r})"

    def fetch(self, kernel_id: str) -> bytes:
        """The artifact's bytes, checked against ``kernel_id``.

        Raises:
            KernelNotFoundError: no artifact with this id is stored.
            ArtifactIntegrityError: the stored bytes do not hash to ``kernel_id``.
            ConfigurationError: ``kernel_id`` is not a sha256 hex digest.
            LibraryUnavailableError: a remote library could not be reached.
        """
        started = time.perf_counter()
        data = self.library.get_kernel_bytes(kernel_id)
        logger.debug(
            "fetched kernel %s (%d bytes) in %.1f ms",
            kernel_id,
            len(data),
            (time.perf_counter() - started) * 1e3,
        )
        return data

    def resolve(self, name: str) -> str:
        """The kernel id ``name`` (an id, a unique id prefix or an alias) stands for.

        Raises:
            KernelNotFoundError: nothing goes by that name (the message names it).
            AmbiguousKernelNameError: the id prefix matches several kernels.
        """
        return self.library.resolve_kernel(name)

    def close(self) -> None:
        """Close the library if this source owns it."""
        if self._owns_library:
            self.library.close()
