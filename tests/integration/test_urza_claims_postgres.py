"""Concurrent job claims on a real PostgreSQL: four claimers (own handles, ``FOR UPDATE SKIP
LOCKED``) drain one queue; every job is handed out exactly once, and a lapsed lease goes to
exactly one of several simultaneous reclaimers."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from esper.contracts import BlueprintSpec, CompileJob, CompileJobStatus
from esper.urza import ArtifactLibrary, open_storage_library
from esper.urza.storage_library import StorageLibrary
from factories import FakeClock, linear_target, on_clock

pytestmark = pytest.mark.services

CLAIMERS = 4
TARGET = linear_target(8, 8)


def run_claimers(
    handles: list[ArtifactLibrary], claim: Callable[[ArtifactLibrary, str], list[CompileJob]]
) -> dict[str, list[CompileJob]]:
    """Start one thread per handle at the same instant; return what each one claimed."""
    results: dict[str, list[CompileJob]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(handles))

    def work(index: int) -> None:
        worker_id = f"worker-{index}"
        try:
            start.wait()
            results[worker_id] = claim(handles[index], worker_id)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(handles))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    return results


def drain(library: ArtifactLibrary, worker_id: str) -> list[CompileJob]:
    claimed = []
    while (job := library.claim_job(worker_id, lease_seconds=300)) is not None:
        claimed.append(job)
    return claimed


def test_each_job_is_claimed_exactly_once(postgres_url: str, tmp_path: Path) -> None:
    jobs_count = 60
    setup = open_storage_library(metadata_url=postgres_url, blob_url=str(tmp_path))
    spec = BlueprintSpec(family="residual_mlp", params={"hidden": 4})
    setup.submit_blueprint(spec)
    queued = {
        setup.enqueue_job(spec.blueprint_id, TARGET, init_seed=s).job_id for s in range(jobs_count)
    }
    handles = [
        open_storage_library(metadata_url=postgres_url, blob_url=str(tmp_path))
        for _ in range(CLAIMERS)
    ]

    results = run_claimers(handles, drain)

    counts = Counter(job.job_id for jobs in results.values() for job in jobs)
    assert set(counts) == queued and max(counts.values()) == 1
    stored = setup.list_jobs()
    assert {j.status for j in stored} == {CompileJobStatus.CLAIMED}
    assert {j.attempts for j in stored} == {1}
    assert {j.job_id: j.worker_id for j in stored} == {
        job.job_id: worker for worker, jobs in results.items() for job in jobs
    }
    for handle in (setup, *handles):
        handle.close()


def test_a_lapsed_lease_goes_to_exactly_one_reclaimer(postgres_url: str, tmp_path: Path) -> None:
    clock = FakeClock()  # every handle reads the test's time: the lease lapses without sleeping

    def handle() -> StorageLibrary:
        return on_clock(
            open_storage_library(metadata_url=postgres_url, blob_url=str(tmp_path)), clock
        )

    setup = handle()
    spec = BlueprintSpec(family="residual_mlp", params={"hidden": 4})
    setup.submit_blueprint(spec)
    job = setup.enqueue_job(spec.blueprint_id, TARGET)
    setup.claim_job("dies", lease_seconds=10)
    handles: list[ArtifactLibrary] = [handle() for _ in range(CLAIMERS)]
    clock.advance(10)
    assert handles[0].claim_job("too-early", lease_seconds=300) is None  # held to its last second
    clock.advance(0.001)

    results = run_claimers(handles, drain)

    winners = {worker: jobs for worker, jobs in results.items() if jobs}
    assert len(winners) == 1
    [(winner, [reclaimed])] = winners.items()
    assert (reclaimed.job_id, reclaimed.worker_id, reclaimed.attempts) == (job.job_id, winner, 2)
    assert reclaimed.lease_expires_at == clock() + 300
    for library in (setup, *handles):
        library.close()
