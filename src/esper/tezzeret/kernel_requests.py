"""Kernel requests: reuse a compiled kernel from Urza, or queue a compile and wait for it.

:func:`find_or_enqueue` answers "I need this blueprint for this layer" at once: a kernel the
library holds, or the compile job queued for it. The waiting is here too, once for everyone
who polls job status: :func:`wait_for_jobs` (until jobs finish, a timeout or a stop event),
:func:`wait_for_kernel` (one request's kernel, or why there is none) and :func:`jobs_in_flight`
(compile jobs queued or being compiled now). :class:`KernelLookup` does both steps off the
caller's thread (a training loop never waits for a compile).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from esper.contracts import (
    BlueprintSpec,
    BlueprintStatus,
    CompileJob,
    CompileJobStatus,
    KernelMetadata,
    KernelTarget,
)
from esper.errors import EsperError
from esper.tezzeret.compiler import BlueprintValidationError
from esper.urza import ArtifactLibrary

FINISHED = frozenset({CompileJobStatus.SUCCEEDED, CompileJobStatus.FAILED})
"""Statuses a compile job never leaves."""

POLL_INTERVAL_S = 0.05
"""Pause between two reads of a job's status."""


class KernelUnavailableError(EsperError):
    """A requested kernel did not come: its compile failed, did not finish in time, or the wait
    was stopped."""


@dataclass(frozen=True)
class KernelRequest:
    """The answer to "I need this blueprint for this layer": a kernel now, or a compile job."""

    blueprint_id: str
    kernel: KernelMetadata | None = None
    job: CompileJob | None = None

    @property
    def ready(self) -> bool:
        """Whether a compiled kernel is already in the library."""
        return self.kernel is not None


def find_or_enqueue(
    library: ArtifactLibrary, spec: BlueprintSpec, target: KernelTarget, *, init_seed: int = 0
) -> KernelRequest:
    """Find a kernel compiled from ``spec`` for ``target`` (same geometry, device, dtype and seed),
    or enqueue a compile job (deduplicated by the library) and return it.

    A hit reads the library and writes nothing (two indexed reads on a SQL library).

    Raises:
        BlueprintValidationError: the blueprint was already found invalid.
    """
    record = library.submit_blueprint(spec)
    if record.status is BlueprintStatus.INVALID:
        raise BlueprintValidationError(spec, target, record.reason or "marked invalid")
    matches = library.find_kernels(
        blueprint_id=record.blueprint_id,
        target=target,
        device=target.device,
        dtype=target.dtype,
        init_seed=init_seed,
        limit=1,
    )
    if matches:
        return KernelRequest(blueprint_id=record.blueprint_id, kernel=matches[0])
    job = library.enqueue_job(record.blueprint_id, target, init_seed=init_seed)
    return KernelRequest(blueprint_id=record.blueprint_id, job=job)


def wait_for_jobs(
    library: ArtifactLibrary,
    job_ids: Sequence[str],
    *,
    timeout_s: float,
    stop: threading.Event | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    poll_interval_s: float = POLL_INTERVAL_S,
) -> dict[str, CompileJob]:
    """Read the jobs' status every ``poll_interval_s`` until every one finished (SUCCEEDED or
    FAILED), ``timeout_s`` passed, or ``stop`` was set.

    Args:
        library: where the jobs were queued.
        job_ids: the jobs to wait for.
        timeout_s: the longest wait.
        stop: return early once set (e.g. a component closing).
        on_progress: called with ``(finished, total)`` whenever the count changes (first with
            0 finished) and once at the end.

    Returns:
        The last status read of every job that was read, by id (a job is read until it
        finishes; look for those whose status is not in :data:`FINISHED`).
    """
    started = time.monotonic()
    jobs: dict[str, CompileJob] = {}
    pending = list(job_ids)
    total, reported = len(pending), -1
    while pending and time.monotonic() - started < timeout_s:
        if stop is not None and stop.is_set():
            break
        if on_progress is not None and total - len(pending) != reported:
            reported = total - len(pending)
            on_progress(reported, total)
        jobs.update((job_id, library.get_job(job_id)) for job_id in pending)
        pending = [job_id for job_id in pending if jobs[job_id].status not in FINISHED]
        if pending:
            if stop is not None:
                stop.wait(poll_interval_s)
            else:
                time.sleep(poll_interval_s)
    if on_progress is not None:
        on_progress(total - len(pending), total)
    return jobs


def wait_for_kernel(
    library: ArtifactLibrary,
    request: KernelRequest,
    *,
    timeout_s: float,
    stop: threading.Event | None = None,
) -> KernelMetadata:
    """The kernel of ``request``: at once when the library had it, else once its compile job
    succeeded (see :func:`wait_for_jobs`).

    Raises:
        KernelUnavailableError: the job failed (with the compiler's reason), did not finish
            within ``timeout_s``, or ``stop`` was set first.
    """
    if request.kernel is not None:
        return request.kernel
    if request.job is None:
        raise KernelUnavailableError("a kernel request has neither a kernel nor a compile job")
    job_id = request.job.job_id
    job = wait_for_jobs(library, [job_id], timeout_s=timeout_s, stop=stop).get(job_id)
    if job is not None and job.status is CompileJobStatus.SUCCEEDED and job.kernel_id is not None:
        return library.get_kernel_metadata(job.kernel_id)
    if job is not None and job.status is CompileJobStatus.FAILED:
        raise KernelUnavailableError(f"compile job {job_id} failed: {job.error}")
    if stop is not None and stop.is_set():
        raise KernelUnavailableError("the wait for a compile was stopped (its owner closed)")
    if job is not None and job.status is CompileJobStatus.SUCCEEDED:
        raise KernelUnavailableError(f"compile job {job_id} succeeded without naming a kernel")
    raise KernelUnavailableError(
        f"compile job {job_id} did not finish within {timeout_s:g}s; is a Tezzeret worker "
        "running (urza.worker: process or thread, or esper tezzeret worker)?"
    )


def jobs_in_flight(library: ArtifactLibrary, *, now: float | None = None) -> int:
    """Compile jobs queued, or claimed by a worker whose lease is still live at ``now`` (default:
    the current time; a claim whose lease lapsed belongs to a dead worker)."""
    queued = library.stats().jobs_by_status[CompileJobStatus.QUEUED]
    now = time.time() if now is None else now
    claimed = sum(
        1
        for job in library.list_jobs(CompileJobStatus.CLAIMED)
        if job.lease_expires_at is None or job.lease_expires_at > now
    )
    return queued + claimed


class KernelLookup:
    """Finds or compiles kernels on background threads.

    Args:
        library: where kernels are found and compiles are queued (a Tezzeret worker, the run's
            own or an external one, must compile into it).
        timeout_s: the longest wait for one compile.
        threads: lookups run at once.
    """

    def __init__(self, library: ArtifactLibrary, *, timeout_s: float, threads: int = 2) -> None:
        self.library = library
        self.timeout_s = timeout_s
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="esper-kernels")

    def resolve(self, spec: BlueprintSpec, target: KernelTarget) -> Future[KernelMetadata]:
        """The kernel of ``spec`` for ``target``, as a future (:func:`find_or_enqueue`, then
        :func:`wait_for_kernel`); it fails with the reason when no kernel comes."""
        return self._pool.submit(self._resolve, spec, target)

    def _resolve(self, spec: BlueprintSpec, target: KernelTarget) -> KernelMetadata:
        request = find_or_enqueue(self.library, spec, target)
        return wait_for_kernel(self.library, request, timeout_s=self.timeout_s, stop=self._stop)

    def close(self) -> None:
        """Stop waiting: lookups in progress fail, queued ones are cancelled."""
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
