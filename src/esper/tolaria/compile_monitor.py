"""Compile monitor: counts a run's compile jobs in flight, off the training thread.

The count (:func:`esper.tezzeret.jobs_in_flight`) marks the ``step`` records of steps that ran
while a compile was queued or running (``compiling``), which is how a run's metrics show what
background compiles cost it. The worker that compiles is :mod:`esper.tolaria.compile_worker`.
"""

from __future__ import annotations

import logging
import threading
import time

from esper.tezzeret import jobs_in_flight
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
            count = jobs_in_flight(self.library)
        except Exception as exc:  # the library being away must never matter to training
            self.errors += 1
            logger.debug("compile monitor: %s", exc)
            return
        with self._lock:
            if started >= self._as_of:
                self._as_of = started
                self.in_flight = count

    def stop(self, timeout: float = 5.0) -> None:
        """Stop counting."""
        self._stop.set()
        self._thread.join(timeout)
