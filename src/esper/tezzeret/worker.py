"""The Tezzeret worker: claim compile jobs from Urza, compile, store, announce ``kernel.ready``.

Any number of workers may share one library: claims are atomic, so each job is compiled by one
worker, and a job whose worker died is reclaimed once its lease lapses. A worker runs on its own
thread (:meth:`TezzeretWorker.start`) or as its own process (``esper tezzeret worker``), never on
the training thread.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections import Counter

from esper.contracts import BlueprintStatus, CompileJob, KernelReady, Topic
from esper.oona import MessageBus
from esper.tezzeret.compiler import BlueprintValidationError, compile_blueprint
from esper.urza import DEFAULT_LEASE_SECONDS, ArtifactLibrary

logger = logging.getLogger(__name__)


def default_worker_id() -> str:
    """``tezzeret-<host>-<pid>-<random>``: unique per worker."""
    return f"tezzeret-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class TezzeretWorker:
    """Compiles the jobs queued in an artifact library.

    Args:
        library: where jobs are claimed and kernels stored.
        bus: where ``kernel.ready`` is announced (optional).
        worker_id: this worker's name in job claims.
        poll_interval_s: sleep between claims when the queue is empty.
        lease_seconds: how long a claimed job stays this worker's before it may be reclaimed.
        parent_pid: stop when this process is no longer the worker's parent (the process that
            started the worker died): a worker process never outlives its training run.
    """

    def __init__(
        self,
        library: ArtifactLibrary,
        bus: MessageBus | None = None,
        *,
        worker_id: str | None = None,
        poll_interval_s: float = 0.2,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        parent_pid: int | None = None,
    ) -> None:
        self.library = library
        self.bus = bus
        self.worker_id = worker_id or default_worker_id()
        self.poll_interval_s = poll_interval_s
        self.lease_seconds = lease_seconds
        self.parent_pid = parent_pid
        self.counters: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> CompileJob | None:
        """Claim one job and compile it; ``None`` if the queue was empty."""
        job = self.library.claim_job(self.worker_id, lease_seconds=self.lease_seconds)
        if job is None:
            return None
        blueprint = self.library.get_blueprint(job.blueprint_id)
        try:
            compiled = compile_blueprint(blueprint.spec, job.target, init_seed=job.init_seed)
        except BlueprintValidationError as exc:
            logger.warning("job %s: %s", job.job_id, exc)
            self.counters["invalid"] += 1
            self.library.set_blueprint_status(job.blueprint_id, BlueprintStatus.INVALID, exc.reason)
            return self.library.fail_job(job.job_id, self.worker_id, str(exc))
        except Exception as exc:  # a compiler crash fails the job, never the worker
            logger.exception("job %s: compile crashed", job.job_id)
            self.counters["failed"] += 1
            return self.library.fail_job(job.job_id, self.worker_id, f"compile crashed: {exc!r}")
        self.library.put_kernel(compiled.artifact, compiled.metadata)
        done = self.library.complete_job(job.job_id, self.worker_id, compiled.kernel_id)
        self.counters["compiled"] += 1
        self._announce(done, compiled.kernel_id)
        return done

    def _announce(self, job: CompileJob, kernel_id: str) -> None:
        if self.bus is None:
            return
        ready = KernelReady(
            kernel_id=kernel_id, blueprint_id=job.blueprint_id, target=job.target, job_id=job.job_id
        )
        try:
            self.bus.publish(Topic.KERNEL_READY, ready)
        except Exception as exc:  # the kernel is stored; a lost announcement is not fatal
            self.counters["announce_failed"] += 1
            logger.warning("could not announce kernel %s on the bus: %s", kernel_id[:12], exc)

    def run(self, *, max_jobs: int | None = None, stop_when_idle: bool = False) -> int:
        """Compile jobs until :meth:`stop` (or ``max_jobs``, or an empty queue if
        ``stop_when_idle``); returns the number of jobs handled."""
        handled = 0
        while not self._stop.is_set() and (max_jobs is None or handled < max_jobs):
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                logger.warning(
                    "worker %s: parent %d is gone; stopping", self.worker_id, self.parent_pid
                )
                break
            try:
                job = self.run_once()
            except Exception as exc:  # library unreachable: keep trying, never die
                logger.warning("worker %s: %s; retrying", self.worker_id, exc)
                self.counters["library_errors"] += 1
                self._stop.wait(self.poll_interval_s * 5)
                continue
            if job is None:
                if stop_when_idle:
                    break
                self._stop.wait(self.poll_interval_s)
                continue
            handled += 1
        return handled

    def start(self) -> TezzeretWorker:
        """Run :meth:`run` on a background daemon thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name=self.worker_id, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Ask the loop to stop after the job in hand, and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
