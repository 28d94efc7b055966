"""Tezzeret worker: claims jobs from Urza, compiles each exactly once, stores, announces."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from starlette.testclient import TestClient
from torch import nn

import esper
from esper.blueprints import create_artifact
from esper.contracts import (
    BlueprintSpec,
    BlueprintStatus,
    CompileJobStatus,
    KernelFailed,
    KernelReady,
    KernelTarget,
    SeedState,
    Topic,
)
from esper.oona import open_bus
from esper.tezzeret import BlueprintValidationError, TezzeretWorker, find_or_enqueue
from esper.urza import ArtifactLibrary, HttpUrza, UrzaArtifactSource, create_app, open_library
from esper.urza.blob_stores import LocalBlobStore
from esper.urza.settings import ServiceLimits
from esper.urza.storage_library import StorageLibrary
from factories import FakeClock, linear_target, on_clock


@pytest.fixture
def library(tmp_path: Path) -> ArtifactLibrary:
    lib = open_library(
        metadata_url=f"sqlite:///{tmp_path}/urza.sqlite3", blob_url=f"file://{tmp_path}/blobs"
    )
    yield lib
    lib.close()


def _target(width: int) -> KernelTarget:
    return linear_target(width, width)


def test_find_or_enqueue_then_worker_compiles_and_announces(library: ArtifactLibrary) -> None:
    bus = open_bus("memory://")
    ready = bus.subscribe(Topic.KERNEL_READY, "test", "c1")
    spec = BlueprintSpec(family="lowrank_adapter", params={"rank": 2})

    request = find_or_enqueue(library, spec, _target(8))
    assert not request.ready and request.job is not None
    assert find_or_enqueue(library, spec, _target(8)).job == request.job  # deduplicated

    worker = TezzeretWorker(library, bus, worker_id="w1")
    assert worker.run(stop_when_idle=True) == 1
    job = library.get_job(request.job.job_id)
    assert job.status is CompileJobStatus.SUCCEEDED and job.worker_id == "w1"
    assert library.get_blueprint(request.blueprint_id).status is BlueprintStatus.VALID

    announced = [d.decode(KernelReady) for d in ready.poll()]
    assert [a.kernel_id for a in announced] == [job.kernel_id]
    again = find_or_enqueue(library, spec, _target(8))
    assert again.ready and again.kernel is not None and again.kernel.kernel_id == job.kernel_id


def test_invalid_blueprint_is_marked_with_reason(library: ArtifactLibrary) -> None:
    spec = BlueprintSpec(family="conv_adapter")
    request = find_or_enqueue(library, spec, _target(8))
    TezzeretWorker(library, worker_id="w1").run(stop_when_idle=True)
    assert request.job is not None
    assert library.get_job(request.job.job_id).status is CompileJobStatus.FAILED
    record = library.get_blueprint(request.blueprint_id)
    assert record.status is BlueprintStatus.INVALID
    assert record.reason is not None and "channels-first" in record.reason
    with pytest.raises(BlueprintValidationError):
        find_or_enqueue(library, spec, _target(8))


def test_four_workers_compile_each_job_exactly_once(tmp_path: Path) -> None:
    urls = {
        "metadata_url": f"sqlite:///{tmp_path}/urza.sqlite3",
        "blob_url": f"file://{tmp_path}/blobs",
    }
    setup = open_library(**urls)
    jobs = [
        find_or_enqueue(
            setup, BlueprintSpec(family="lowrank_adapter", params={"rank": 2}), _target(w)
        ).job
        for w in range(4, 16)
    ]
    workers = [TezzeretWorker(open_library(**urls), worker_id=f"w{i}") for i in range(4)]
    threads = [threading.Thread(target=w.run, kwargs={"stop_when_idle": True}) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sum(w.counters["compiled"] for w in workers) == len(jobs)
    finished = [setup.get_job(job.job_id) for job in jobs if job is not None]
    assert all(job.status is CompileJobStatus.SUCCEEDED for job in finished)
    assert all(job.attempts == 1 for job in finished)
    assert setup.stats().kernels == len(jobs)
    for worker in workers:
        worker.library.close()
    setup.close()


def test_compiled_kernel_loads_into_a_live_model(library: ArtifactLibrary) -> None:
    torch.manual_seed(0)
    host = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    model = esper.wrap(host, kernel_source=UrzaArtifactSource(library))
    request = find_or_enqueue(
        library,
        BlueprintSpec(family="residual_mlp", params={"hidden": 4}),
        model.layer("0").target(),
    )
    TezzeretWorker(library).run(stop_when_idle=True)
    assert request.job is not None
    kernel_id = library.get_job(request.job.job_id).kernel_id
    assert kernel_id is not None
    model.load_kernel_sync("0", seed_idx=1, kernel_artifact_id=kernel_id)
    assert model.seed_state("0", 1) is SeedState.BLENDING
    x = torch.randn(4, 8)
    assert torch.equal(model(x), host(x))  # function-preserving graft


# ---------------------------------------------------------------------------------------------
# Issue 9 item 8: a refused artifact fails its job; unreachability is retried


def _refusing_service(tmp_path: Path, max_artifact_bytes: int) -> tuple[HttpUrza, TestClient]:
    """The real service app in-process over an embedded library, refusing large uploads."""
    storage = open_library(run_dir=tmp_path / "service")
    app = create_app(storage, "token", limits=ServiceLimits(max_artifact_bytes=max_artifact_bytes))
    client = TestClient(app, raise_server_exceptions=False)
    return HttpUrza("http://testserver", token="token", client=client), client


def test_refused_artifact_fails_the_job_after_one_compile_and_announces_it(
    tmp_path: Path,
) -> None:
    remote, client = _refusing_service(tmp_path, max_artifact_bytes=600)
    bus = open_bus("memory://")
    failures = bus.subscribe(Topic.KERNEL_FAILED, "test", "t")
    spec = BlueprintSpec(family="lowrank_adapter", params={"rank": 2})
    request = find_or_enqueue(remote, spec, _target(8))
    assert request.job is not None

    worker = TezzeretWorker(remote, bus, worker_id="w1", poll_interval_s=0.01)
    assert worker.run(stop_when_idle=True) == 1

    job = remote.get_job(request.job.job_id)
    assert job.status is CompileJobStatus.FAILED and job.attempts == 1
    assert job.error is not None and "refused" in job.error and "ArtifactTooLargeError" in job.error
    assert "600" in job.error
    assert (worker.counters["refused"], worker.counters["compiled"]) == (1, 0)
    assert worker.counters["library_errors"] == 0  # not mistaken for an unreachable library
    announced = [d.decode(KernelFailed) for d in failures.poll()]
    assert [(a.job_id, a.error) for a in announced] == [(job.job_id, job.error)]
    assert remote.stats().kernels == 0
    assert remote.claim_job("w2") is None  # nothing left to recompile
    client.close()


def test_a_job_claimed_too_many_times_is_abandoned(tmp_path: Path) -> None:
    clock = FakeClock()  # the leases lapse without sleeping
    storage = on_clock(open_library(run_dir=tmp_path), clock)
    bus = open_bus("memory://")
    failures = bus.subscribe(Topic.KERNEL_FAILED, "test", "t")
    request = find_or_enqueue(storage, BlueprintSpec(family="lowrank_adapter"), _target(8))
    assert request.job is not None
    for dead in range(3):  # three workers claimed it and died mid-compile
        assert storage.claim_job(f"dead-{dead}", lease_seconds=10) is not None
        clock.advance(11)

    worker = TezzeretWorker(storage, bus, worker_id="w", max_attempts=3)
    assert worker.run(stop_when_idle=True) == 1

    job = storage.get_job(request.job.job_id)
    assert job.status is CompileJobStatus.FAILED and job.attempts == 4
    assert job.error is not None and "abandoned after 3 attempts" in job.error
    assert (worker.counters["abandoned"], worker.counters["compiled"]) == (1, 0)
    assert [d.decode(KernelFailed).job_id for d in failures.poll()] == [job.job_id]
    storage.close()


def test_a_transient_store_failure_is_retried_not_failed(library: ArtifactLibrary) -> None:
    spec = BlueprintSpec(family="lowrank_adapter", params={"rank": 2})
    kernel_id = create_artifact(spec, _target(8))[1].kernel_id
    assert isinstance(library, StorageLibrary) and isinstance(library.blobs, LocalBlobStore)
    shard = library.blobs.root / kernel_id[:2]
    shard.write_bytes(b"")  # a file where the blob's folder goes: every store fails for now
    request = find_or_enqueue(library, spec, _target(8))
    worker = TezzeretWorker(library, worker_id="w", poll_interval_s=0.02)
    thread = threading.Thread(target=worker.run, kwargs={"stop_when_idle": True})
    thread.start()
    deadline = time.monotonic() + 60
    while worker.counters["store_retries"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    shard.unlink()  # the store comes back
    thread.join(timeout=60)

    assert request.job is not None
    job = library.get_job(request.job.job_id)
    assert worker.counters["store_retries"] >= 1 and worker.counters["refused"] == 0
    assert job.status is CompileJobStatus.SUCCEEDED and job.attempts == 1
    assert job.kernel_id == kernel_id
