"""Compile monitor: counts a run's compile jobs in flight, off the training thread.

(The worker process itself is :class:`esper.tezzeret.TezzeretProcess`.)
"""

from __future__ import annotations

import logging
import threading
import time

from esper.contracts import CompileJobStatus
from esper.urza import ArtifactLibrary

logger = logging.getLogger(__name__)


class CompileMonitor:
    """Counts the library's compile jobs that are queued or claimed (with a live lease) every
    ``interval_s`` on a daemon thread; the training thread only reads :attr:`in_flight`.

    Args:
        library: the run's Urza library.
        interval_s: how often to count.
    """

    def __init__(self, library: ArtifactLibrary, *, interval_s: float = 0.1) -> None:
        self.library = library
        self.interval_s = interval_s
        self.in_flight = 0
        """Compile jobs queued or being compiled, as of the last count."""
        self.errors = 0
        self._as_of = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="compile-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.interval_s)

    def refresh(self) -> None:
        """Count now (a count that started earlier and finishes later is then discarded)."""
        started = time.monotonic()
        try:
            queued = self.library.stats().jobs_by_status[CompileJobStatus.QUEUED]
            now = time.time()
            claimed = sum(  # a claim whose lease lapsed belongs to a dead worker
                1
                for job in self.library.list_jobs(CompileJobStatus.CLAIMED)
                if job.lease_expires_at is None or job.lease_expires_at > now
            )
        except Exception as exc:  # the library being away must never matter to training
            self.errors += 1
            logger.debug("compile monitor: %s", exc)
            return
        with self._lock:
            if started >= self._as_of:
                self._as_of = started
                self.in_flight = queued + claimed

    def stop(self, timeout: float = 5.0) -> None:
        """Stop counting."""
        self._stop.set()
        self._thread.join(timeout)
