"""The Tezzeret worker: claim compile jobs from Urza, compile, store, announce the outcome.

Any number of workers may share one library: claims are atomic, so each job is compiled by one
worker, and a job whose worker died is reclaimed once its lease lapses. A worker runs on its own
thread (:meth:`TezzeretWorker.start`) or as its own process (``esper tezzeret worker``), never on
the training thread.

Every job ends SUCCEEDED (``kernel.ready`` announced) or FAILED with the reason (``kernel.failed``
announced), and whoever waits for it hears either way. What fails a job is what would fail again:
the blueprint is invalid for the target, the compiler crashed, the library *refused* the compiled
artifact (over the service's size limit, metadata not describing the bytes; see
:data:`esper.urza.errors.ARTIFACT_REFUSALS`), or the job was claimed more than ``max_attempts``
times (its earlier workers never finished it). A library that cannot be *reached* is transient:
the store is retried with backoff, and then the job is left to be reclaimed.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections import Counter

from esper.contracts import (
    BlueprintStatus,
    CompileJob,
    Contract,
    KernelFailed,
    KernelReady,
    Topic,
)
from esper.contracts.bounds import text_within_bounds
from esper.oona import MessageBus
from esper.tezzeret.compiler import BlueprintValidationError, CompiledKernel, compile_blueprint
from esper.urza import DEFAULT_LEASE_SECONDS, ArtifactLibrary, JobStateError
from esper.urza.errors import ARTIFACT_REFUSALS

DEFAULT_MAX_ATTEMPTS = 3
"""Claims of one job before a worker fails it instead of compiling it again."""

STORE_TRIES = 4
"""Tries to store a compiled kernel while the library is unreachable, before leaving the job."""

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
        max_attempts: a job claimed for the ``max_attempts + 1``-th time is failed, not compiled
            (each earlier claimer stopped before finishing it).
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
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        self.library = library
        self.bus = bus
        self.worker_id = worker_id or default_worker_id()
        self.poll_interval_s = poll_interval_s
        self.lease_seconds = lease_seconds
        self.parent_pid = parent_pid
        self.max_attempts = max_attempts
        self.counters: Counter[str] = Counter()
        """``compiled``, ``invalid``, ``failed`` (compiler crashed), ``refused`` (by the library),
        ``abandoned`` (too many attempts), ``lease_lost``, ``store_retries``,
        ``library_errors``, ``announce_failed``."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> CompileJob | None:
        """Claim one job and see it to its end; ``None`` if the queue was empty.

        Raises:
            Exception: the library could not be reached (the job stays claimed until its lease
                lapses; :meth:`run` logs and retries).
        """
        job = self.library.claim_job(self.worker_id, lease_seconds=self.lease_seconds)
        if job is None:
            return None
        if job.attempts > self.max_attempts:
            return self._fail(
                job,
                f"abandoned after {job.attempts - 1} attempts: every worker that claimed it "
                "stopped before finishing (crashed, killed, or lost the library); see the "
                "workers' logs",
                counter="abandoned",
            )
        blueprint = self.library.get_blueprint(job.blueprint_id)
        try:
            compiled = compile_blueprint(blueprint.spec, job.target, init_seed=job.init_seed)
        except BlueprintValidationError as exc:
            logger.warning("job %s: %s", job.job_id, exc)
            self.library.set_blueprint_status(job.blueprint_id, BlueprintStatus.INVALID, exc.reason)
            return self._fail(job, str(exc), counter="invalid")
        except Exception as exc:  # a compiler crash fails the job, never the worker
            logger.exception("job %s: compile crashed", job.job_id)
            return self._fail(job, f"compile crashed: {exc!r}", counter="failed")
        return self._store(job, compiled)

    def _store(self, job: CompileJob, compiled: CompiledKernel) -> CompileJob:
        """Put the kernel and complete the job; a refusal fails it, unreachability is retried."""
        for attempt in range(STORE_TRIES):
            try:
                self.library.put_kernel(compiled.artifact, compiled.metadata)
                break
            except ARTIFACT_REFUSALS as exc:
                logger.warning(
                    "job %s: the library refused kernel %s: %s",
                    job.job_id,
                    compiled.kernel_id[:12],
                    exc,
                )
                return self._fail(
                    job,
                    f"the library refused the compiled kernel {compiled.kernel_id} "
                    f"({type(exc).__name__}): {exc}",
                    counter="refused",
                )
            except Exception as exc:  # unreachable or failing: transient, try again
                if attempt == STORE_TRIES - 1 or self._stop.is_set():
                    raise
                self.counters["store_retries"] += 1
                logger.warning(
                    "job %s: could not store kernel %s (%s); retrying",
                    job.job_id,
                    compiled.kernel_id[:12],
                    exc,
                )
                self._stop.wait(self.poll_interval_s * 5 * 2**attempt)
        try:
            done = self.library.complete_job(job.job_id, self.worker_id, compiled.kernel_id)
        except JobStateError as exc:  # the lease lapsed and another worker has the job now
            self.counters["lease_lost"] += 1
            logger.warning("job %s: %s", job.job_id, exc)
            return self.library.get_job(job.job_id)
        self.counters["compiled"] += 1
        ready = KernelReady(
            kernel_id=compiled.kernel_id,
            blueprint_id=done.blueprint_id,
            target=done.target,
            job_id=done.job_id,
        )
        self._announce(Topic.KERNEL_READY, ready)
        return done

    def _fail(self, job: CompileJob, reason: str, *, counter: str) -> CompileJob:
        """Mark the job FAILED with ``reason`` and announce it on ``kernel.failed``."""
        self.counters[counter] += 1
        failed = self.library.fail_job(job.job_id, self.worker_id, reason)
        failure = KernelFailed(
            job_id=failed.job_id,
            blueprint_id=failed.blueprint_id,
            target=failed.target,
            init_seed=failed.init_seed,
            error=failed.error if failed.error is not None else text_within_bounds(reason),
        )
        self._announce(Topic.KERNEL_FAILED, failure)
        return failed

    def _announce(self, topic: Topic, message: Contract) -> None:
        if self.bus is None:
            return
        try:
            self.bus.publish(topic, message)
        except Exception as exc:  # the job's outcome is stored; a lost announcement is not fatal
            self.counters["announce_failed"] += 1
            logger.warning("could not announce on %s: %s", topic.value, exc)

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
                logger.warning("worker %s: library error (%s); retrying", self.worker_id, exc)
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
