"""Concurrent job claims on SQLite: four claimers, each with its own library handle, one queue."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

from esper.contracts import BlueprintSpec, CompileJobStatus, KernelTarget
from esper.urza import open_storage_library
from factories import FakeClock, on_clock

JOBS = 40
CLAIMERS = 4


def test_each_job_is_claimed_exactly_once(
    tmp_path: Path, spec: BlueprintSpec, linear_target
) -> None:
    setup = open_storage_library(run_dir=tmp_path)
    blueprint_id = setup.submit_blueprint(spec).blueprint_id
    target: KernelTarget = linear_target(16, 8)
    queued = {
        setup.enqueue_job(blueprint_id, target, init_seed=seed).job_id for seed in range(JOBS)
    }
    handles = [open_storage_library(run_dir=tmp_path) for _ in range(CLAIMERS)]
    claims: dict[str, list[str]] = {f"worker-{i}": [] for i in range(CLAIMERS)}
    errors: list[BaseException] = []
    start = threading.Barrier(CLAIMERS)

    def claim_until_empty(worker_id: str, index: int) -> None:
        try:
            start.wait()
            while (job := handles[index].claim_job(worker_id, lease_seconds=300)) is not None:
                claims[worker_id].append(job.job_id)
        except BaseException as error:  # surfaced by the assertion below
            errors.append(error)

    threads = [
        threading.Thread(target=claim_until_empty, args=(worker_id, i))
        for i, worker_id in enumerate(claims)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    claimed = Counter(job_id for ids in claims.values() for job_id in ids)
    assert set(claimed) == queued
    assert max(claimed.values()) == 1  # nobody got a job twice
    jobs = setup.list_jobs()
    assert {j.status for j in jobs} == {CompileJobStatus.CLAIMED}
    assert {j.attempts for j in jobs} == {1}
    assert {j.job_id: j.worker_id for j in jobs} == {
        job_id: worker for worker, ids in claims.items() for job_id in ids
    }
    for handle in (setup, *handles):
        handle.close()


def test_a_lapsed_lease_goes_to_exactly_one_reclaimer(
    tmp_path: Path, spec: BlueprintSpec, linear_target
) -> None:
    clock = FakeClock()  # every handle reads the test's time: the lease lapses without sleeping
    setup = on_clock(open_storage_library(run_dir=tmp_path), clock)
    setup.submit_blueprint(spec)
    job = setup.enqueue_job(spec.blueprint_id, linear_target())
    setup.claim_job("dies", lease_seconds=10)
    handles = [on_clock(open_storage_library(run_dir=tmp_path), clock) for _ in range(CLAIMERS)]
    clock.advance(10)
    assert handles[0].claim_job("too-early", lease_seconds=300) is None  # held to its last second
    clock.advance(0.001)
    won: dict[str, str] = {}
    start = threading.Barrier(CLAIMERS)

    def reclaim(index: int) -> None:
        start.wait()
        claimed = handles[index].claim_job(f"rescuer-{index}", lease_seconds=300)
        if claimed is not None:
            won[f"rescuer-{index}"] = claimed.job_id

    threads = [threading.Thread(target=reclaim, args=(i,)) for i in range(CLAIMERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert len(won) == 1 and list(won.values()) == [job.job_id]
    stored = setup.get_job(job.job_id)
    assert (stored.worker_id, stored.attempts) == (next(iter(won)), 2)
    assert stored.lease_expires_at == clock() + 300  # the rescuer's lease, on the same clock
    for handle in (setup, *handles):
        handle.close()
