"""What ``esper.wrap`` uses when it is not told: the user's default library, and telemetry by URL.

**Default kernel library.** ``esper.wrap(model)`` without ``kernel_source`` or ``kernel_cache``
loads kernels from the library :func:`esper.urza.open_library` opens with no arguments: the Urza
service at ``ESPER_URZA_URL`` when that is set, else the embedded library in
``ESPER_URZA_RUN_DIR`` (default ``runs/urza``, relative to the working directory: the library
``esper train`` compiles into and ``esper kernel tag`` names kernels in). The library is opened
on the first fetch or name lookup, not by ``wrap``: wrapping never creates files or connects.

**Telemetry by URL.** ``esper.wrap(model, telemetry="redis://host:6379/0")`` publishes every
:meth:`~esper.core.MorphableModel.collect_telemetry` flush to Oona's ``telemetry.health`` topic
through a background sink (never blocking, never raising); ``memory://`` works in-process.

Urza and Oona are imported here lazily, when first used: ``import esper.core`` imports neither.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from esper.contracts import HealthSignal
from esper.errors import ArgumentTypeError, ConfigurationError

logger = logging.getLogger(__name__)


class DefaultLibrarySource:
    """An artifact source over the user's default Urza library, opened on first use.

    Thread-safe; the kernel cache calls :meth:`fetch` from its loader threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._source: Any = None

    def __repr__(self) -> str:
        return (
            f"DefaultLibrarySource({self._source!r})"
            if self._source
            else ("DefaultLibrarySource(not opened yet: ESPER_URZA_URL or ESPER_URZA_RUN_DIR)")
        )

    def __deepcopy__(self, memo: dict[int, object]) -> DefaultLibrarySource:
        """A library connection is a shared service: copies of a model share it (as the cache)."""
        return self

    def _opened(self) -> Any:
        with self._lock:
            if self._source is None:
                from esper.urza import UrzaArtifactSource, open_library

                library = open_library()
                logger.info("kernels come from the default library %r", library)
                self._source = UrzaArtifactSource(library, owns_library=True)
            return self._source

    def fetch(self, kernel_id: str) -> bytes:
        """The artifact's bytes from the default library (digest-checked)."""
        return bytes(self._opened().fetch(kernel_id))

    def resolve(self, name: str) -> str:
        """The kernel id ``name`` (a unique id prefix or an alias) stands for."""
        return str(self._opened().resolve(name))

    def close(self) -> None:
        """Close the library if it was opened."""
        with self._lock:
            source, self._source = self._source, None
        if source is not None:
            source.close()


class BusTelemetrySink:
    """Health-signal flushes to Oona's ``telemetry.health`` topic on the bus at ``url``.

    Args:
        url: ``redis://host:port/db`` or ``memory://``.
        run_id: the run the batches are published under (default ``sdk-<pid>-<time>``).
    """

    def __init__(self, url: str, *, run_id: str | None = None) -> None:
        if not isinstance(url, str):
            raise ArgumentTypeError(f"telemetry must be a bus URL (redis://…), got {url!r:.60}")
        from esper.oona import OonaTelemetrySink, open_bus

        self.url = url
        self.bus = open_bus(url)
        try:
            self.sink = OonaTelemetrySink(
                self.bus, run_id=run_id or f"sdk-{os.getpid()}-{int(time.time())}"
            )
        except BaseException:
            self.bus.close()
            raise

    def __repr__(self) -> str:
        return f"BusTelemetrySink({self.url!r})"

    def __deepcopy__(self, memo: dict[int, object]) -> BusTelemetrySink:
        """A bus connection is a shared service: copies of a model publish through it."""
        return self

    def publish(self, signals: Sequence[HealthSignal]) -> None:
        """Queue one flush (returns at once; bus errors are counted, never raised)."""
        self.sink.publish(signals)

    def close(self, timeout: float | None = 5.0) -> None:
        """Send what is queued (up to ``timeout`` s), then close the bus."""
        try:
            self.sink.close(timeout)
        finally:
            self.bus.close()


def telemetry_sink_for(telemetry: object, sink: object) -> Any:
    """The sink that ``wrap(telemetry=…, telemetry_sink=…)`` asks for (``None``: none)."""
    if telemetry is None:
        return sink
    if sink is not None:
        raise ConfigurationError(
            "give telemetry (a bus URL) or telemetry_sink (an object with publish()), not both"
        )
    return BusTelemetrySink(telemetry)  # type: ignore[arg-type]
