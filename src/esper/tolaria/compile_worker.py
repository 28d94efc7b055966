"""Background compiles of a run: a Tezzeret worker in its own process, and a monitor counting the
compile jobs in flight.

A worker *thread* shares the training process's interpreter lock: the first ``torch.export`` of
a process (about a second and a half of Python) then slows the training steps around it. A worker
*process* compiles on the other core instead; it reads and writes the same Urza library (the
embedded SQLite file and blob folder, or the shared service), so nothing else changes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from esper.contracts import CompileJobStatus
from esper.urza import ArtifactLibrary

logger = logging.getLogger(__name__)


class TezzeretProcess:
    """``esper tezzeret worker`` as a child process, compiling the jobs of one library.

    Args:
        urza_url: the Urza service, if the run uses one.
        run_dir: the embedded library's folder otherwise.
        log_path: where the worker's output goes.
        poll_interval_s: the worker's sleep between claims when the queue is empty.
    """

    def __init__(
        self,
        *,
        urza_url: str | None,
        run_dir: Path | None,
        log_path: Path,
        poll_interval_s: float = 0.05,
    ) -> None:
        command = [sys.executable, "-m", "esper.cli", "--log-level", "INFO", "tezzeret", "worker"]
        command += ["--poll-interval", str(poll_interval_s)]
        command += ["--urza", urza_url] if urza_url else ["--run-dir", str(run_dir)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one core: leave the other to training
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        logger.info("started Tezzeret worker process %d", self.process.pid)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the worker to stop (SIGTERM), then kill it if it does not."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self._log.close()


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
