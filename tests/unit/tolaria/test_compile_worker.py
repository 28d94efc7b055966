"""The run's compile worker: one owner starts it (a thread, a process, or none) and stops it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from esper.contracts import (
    BlueprintSpec,
    CompileJobStatus,
    KernelReady,
    KernelTarget,
    LayerKind,
    Topic,
)
from esper.errors import ConfigurationError
from esper.oona import InProcessBus
from esper.tezzeret import find_or_enqueue, wait_for_jobs
from esper.tolaria.compile_worker import CompileWorker
from esper.urza import ArtifactLibrary, open_library

SPEC = BlueprintSpec(family="lowrank_adapter", params={"rank": 2})
TARGET = KernelTarget(
    layer_kind=LayerKind.LINEAR, in_features=8, out_features=8, channel_dim=-1, spatial_dims=0
)


@pytest.fixture
def library(tmp_path: Path) -> Iterator[ArtifactLibrary]:
    lib = open_library(
        metadata_url=f"sqlite:///{tmp_path}/urza.sqlite3", blob_url=f"file://{tmp_path}/blobs"
    )
    yield lib
    lib.close()


def _compiled(library: ArtifactLibrary, timeout_s: float) -> CompileJobStatus:
    request = find_or_enqueue(library, SPEC, TARGET)
    assert request.job is not None
    return wait_for_jobs(library, [request.job.job_id], timeout_s=timeout_s)[
        request.job.job_id
    ].status


def test_a_thread_worker_compiles_announces_and_stops(library: ArtifactLibrary) -> None:
    bus = InProcessBus()
    ready = bus.subscribe(Topic.KERNEL_READY, "test", "t")

    worker = CompileWorker.start("thread", library, bus=bus)
    status = _compiled(library, timeout_s=120)
    assert worker.thread is not None
    name = worker.thread.worker_id
    worker.stop()

    assert worker.mode == "thread" and worker.process is None
    assert status is CompileJobStatus.SUCCEEDED
    assert [d.decode(KernelReady).job_id for d in ready.poll(10)] == [library.list_jobs()[0].job_id]
    assert name not in {t.name for t in threading.enumerate()}  # the thread is gone


def test_with_no_worker_of_its_own_the_run_leaves_compiles_to_external_workers(
    library: ArtifactLibrary,
) -> None:
    worker = CompileWorker.start("none", library)

    status = _compiled(library, timeout_s=0.2)
    worker.stop()  # nothing to stop

    assert (worker.thread, worker.process) == (None, None)
    assert status is CompileJobStatus.QUEUED


def test_an_unknown_mode_or_a_mismatched_worker_is_refused(library: ArtifactLibrary) -> None:
    with pytest.raises(ConfigurationError, match="unknown compile worker 'gpu'"):
        CompileWorker.start("gpu", library)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"CompileWorker\.start"):
        CompileWorker("thread")


@pytest.mark.slow  # starts a Python process that imports torch: seconds to tens of seconds
def test_a_process_worker_compiles_in_a_child_process_and_stops_with_the_run(
    library: ArtifactLibrary, tmp_path: Path
) -> None:
    worker = CompileWorker.start("process", library, log_path=tmp_path / "tezzeret.log")
    assert worker.process is not None and worker.process.process.poll() is None

    status = _compiled(library, timeout_s=300)
    worker.stop()

    assert status is CompileJobStatus.SUCCEEDED
    assert worker.thread is None  # no compile thread in this process
    assert worker.process.process.poll() is not None  # stopped
    assert (tmp_path / "tezzeret.log").stat().st_size > 0
