"""Tezzeret worker: claims jobs from Urza, compiles each exactly once, stores, announces."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import esper
from esper.contracts import (
    BlueprintSpec,
    BlueprintStatus,
    CompileJobStatus,
    KernelReady,
    KernelTarget,
    LayerKind,
    SeedState,
    Topic,
)
from esper.oona import open_bus
from esper.tezzeret import BlueprintValidationError, TezzeretWorker, find_or_enqueue
from esper.urza import ArtifactLibrary, UrzaArtifactSource, open_library


@pytest.fixture
def library(tmp_path: Path) -> ArtifactLibrary:
    lib = open_library(
        metadata_url=f"sqlite:///{tmp_path}/urza.sqlite3", blob_url=f"file://{tmp_path}/blobs"
    )
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
