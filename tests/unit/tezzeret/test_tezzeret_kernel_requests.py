"""Kernel requests: the one place job status is polled (wait_for_jobs, wait_for_kernel,
jobs_in_flight, KernelLookup), used by the executor, the warm-up and the compile monitor."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from esper.contracts import BlueprintSpec, CompileJobStatus, KernelTarget, LayerKind
from esper.tezzeret import (
    KernelLookup,
    KernelUnavailableError,
    TezzeretWorker,
    find_or_enqueue,
    jobs_in_flight,
    wait_for_jobs,
    wait_for_kernel,
)
from esper.urza import open_storage_library
from esper.urza.storage_library import StorageLibrary

SPEC = BlueprintSpec(family="lowrank_adapter", params={"rank": 2})


class HandClock:
    """A clock the test moves by hand, so leases lapse without sleeping."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> HandClock:
    return HandClock()


@pytest.fixture
def library(tmp_path: Path, clock: HandClock) -> Iterator[StorageLibrary]:
    opened = open_storage_library(run_dir=tmp_path)
    assert isinstance(opened, StorageLibrary)
    lib = StorageLibrary(metadata=opened.metadata, blobs=opened.blobs, clock=clock)
    yield lib
    lib.close()


def _target(width: int) -> KernelTarget:
    return KernelTarget(
        layer_kind=LayerKind.LINEAR,
        in_features=width,
        out_features=width,
        channel_dim=-1,
        spatial_dims=0,
    )


def _fail(library: StorageLibrary, reason: str) -> str:
    job = library.claim_job("test-worker")
    assert job is not None
    library.fail_job(job.job_id, "test-worker", reason)
    return job.job_id


def test_wait_for_jobs_reports_progress_and_the_final_status_of_each(
    library: StorageLibrary,
) -> None:
    jobs = [find_or_enqueue(library, SPEC, _target(w)).job for w in (8, 12)]
    ids = [job.job_id for job in jobs if job is not None]
    failed = [_fail(library, "no"), _fail(library, "no")]
    progress: list[tuple[int, int]] = []

    final = wait_for_jobs(
        library, ids, timeout_s=30, on_progress=lambda d, t: progress.append((d, t))
    )

    assert sorted(failed) == sorted(ids)
    assert {job_id: job.status for job_id, job in final.items()} == {
        job_id: CompileJobStatus.FAILED for job_id in ids
    }
    assert progress == [(0, 2), (2, 2)]  # first with none finished, then at the end


def test_wait_for_jobs_gives_up_at_the_timeout_or_when_stopped(library: StorageLibrary) -> None:
    request = find_or_enqueue(library, SPEC, _target(8))
    assert request.job is not None
    stop = threading.Event()
    stop.set()

    timed_out = wait_for_jobs(library, [request.job.job_id], timeout_s=0.05)
    stopped = wait_for_jobs(library, [request.job.job_id], timeout_s=30, stop=stop)

    assert timed_out[request.job.job_id].status is CompileJobStatus.QUEUED  # nobody compiles
    assert stopped == {}  # stopped before its first read


def test_wait_for_kernel_names_why_no_kernel_came(library: StorageLibrary) -> None:
    failing = find_or_enqueue(library, SPEC, _target(8))
    assert failing.job is not None
    _fail(library, "the compiler ran out of memory")
    waiting = find_or_enqueue(library, SPEC, _target(12))
    stop = threading.Event()
    stop.set()

    with pytest.raises(KernelUnavailableError) as failed:
        wait_for_kernel(library, failing, timeout_s=30)
    with pytest.raises(KernelUnavailableError, match=r"did not finish within 0\.05s"):
        wait_for_kernel(library, waiting, timeout_s=0.05)
    with pytest.raises(KernelUnavailableError, match="stopped"):
        wait_for_kernel(library, waiting, timeout_s=30, stop=stop)

    assert str(failed.value) == (
        f"compile job {failing.job.job_id} failed: the compiler ran out of memory"
    )


def test_a_kernel_lookup_finds_or_compiles_off_the_callers_thread(
    library: StorageLibrary,
) -> None:
    worker = TezzeretWorker(library, poll_interval_s=0.02).start()
    lookup = KernelLookup(library, timeout_s=120)
    try:
        compiled = lookup.resolve(SPEC, _target(8)).result(timeout=120)
        again = lookup.resolve(SPEC, _target(8)).result(timeout=120)
    finally:
        lookup.close()
        worker.stop()

    assert again == compiled  # the second lookup finds the kernel the first one compiled
    assert compiled.target.same_geometry(_target(8))
    (job,) = library.list_jobs()
    assert job.status is CompileJobStatus.SUCCEEDED and job.kernel_id == compiled.kernel_id


def test_a_closed_kernel_lookup_fails_what_it_was_waiting_for(library: StorageLibrary) -> None:
    lookup = KernelLookup(library, timeout_s=300)
    pending = lookup.resolve(SPEC, _target(8))  # nobody compiles it

    lookup.close()

    with pytest.raises(KernelUnavailableError, match="stopped"):
        pending.result(timeout=30)


def test_jobs_in_flight_counts_queued_jobs_and_live_claims_only(
    library: StorageLibrary, clock: HandClock
) -> None:
    for width in (8, 12, 16, 20):
        find_or_enqueue(library, SPEC, _target(width))
    short = library.claim_job("dead-worker", lease_seconds=10)
    long = library.claim_job("live-worker", lease_seconds=600)
    assert short is not None and long is not None
    failed = _fail(library, "no")

    counted_now = jobs_in_flight(library, now=clock.now)
    clock.now += 60  # the short lease lapsed: its worker is gone
    counted_later = jobs_in_flight(library, now=clock.now)

    assert failed not in (short.job_id, long.job_id)
    assert counted_now == 3  # one queued + two claimed (the failed one is finished)
    assert counted_later == 2  # one queued + the live claim
