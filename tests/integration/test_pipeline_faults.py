"""Pipeline faults seen from a training run: growth degrades, training never stops.

* Urza unreachable: a kernel load fails with a clear error, the seed returns to DORMANT, and the
  next training steps run.
* Redis stopped mid-run: telemetry publishing never blocks the training loop, drops are counted,
  and publishing resumes when Redis comes back.
* The library refuses a compiled kernel: the compile job fails once, with the reason, and the
  germination waiting for it is refused at once; training goes on.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

import esper
from esper.blueprints import create_artifact
from esper.contracts import (
    BlueprintSpec,
    CompileJobStatus,
    HealthSignalBatch,
    KernelFailed,
    SeedState,
    Topic,
)
from esper.errors import KernelLoadError
from esper.oona import InProcessBus, OonaTelemetrySink, open_bus
from esper.tamiyo.safety import SafetyConfig, SafetyGates
from esper.tolaria.compile_worker import CompileWorker
from esper.tolaria.growth_executor import GrowthExecutor
from esper.urza import HttpUrza, ServiceProcess, UrzaArtifactSource, open_library
from factories import germinate, linear_target
from servers import free_port, start_redis_server


def _model(**kwargs: object) -> esper.MorphableModel:
    torch.manual_seed(0)
    return esper.wrap(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), **kwargs)


def _train_step(model: esper.MorphableModel, optimizer: torch.optim.Optimizer) -> float:
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.step()
    return float(loss.detach())


def test_unreachable_urza_fails_the_load_clearly_and_training_continues() -> None:
    dead = open_library(f"http://127.0.0.1:{free_port()}", token="irrelevant")
    model = _model(kernel_source=UrzaArtifactSource(dead))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _train_step(model, optimizer)

    with pytest.raises(KernelLoadError, match=r"127\.0\.0\.1.*DORMANT|DORMANT") as caught:
        model.load_kernel_sync("0", seed_idx=0, kernel_artifact_id="ab" * 32)
    assert "could not reach" in str(caught.value.__cause__) or "127.0.0.1" in str(caught.value)
    assert model.seed_state("0", 0) is SeedState.DORMANT

    # the non-blocking form: the step that finds the failure returns the seed to DORMANT
    model.request_kernel("0", seed_idx=1, kernel_artifact_id="cd" * 32)
    deadline = time.monotonic() + 30
    losses = []
    while model.seed_state("0", 1) is SeedState.LOADING and time.monotonic() < deadline:
        losses.append(_train_step(model, optimizer))
    assert model.seed_state("0", 1) is SeedState.DORMANT
    assert "127.0.0.1" in str(model.layer("0").last_errors[1])
    assert all(torch.isfinite(torch.tensor(losses)))
    assert model.kernel_cache.stats().load_failures == 2
    for _ in range(3):
        _train_step(model, optimizer)  # and training simply goes on
    dead.close()


@pytest.mark.services
def test_redis_stopped_mid_run_drops_telemetry_without_blocking_and_recovers(
    tmp_path: Path,
) -> None:
    port = free_port()
    server = start_redis_server(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    prefix = f"esper-faults-{uuid.uuid4().hex[:8]}"
    bus = open_bus(url, stream_prefix=prefix)
    sink = OonaTelemetrySink(bus, run_id="faults", retry_max_s=0.2)
    model = _model(telemetry_sink=sink, health_every=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        for _ in range(3):
            _train_step(model, optimizer)
            model.collect_telemetry()
        assert sink.flush(timeout=10)
        assert sink.counters.published == 3

        server.terminate()
        server.wait(timeout=10)
        step_times = []
        for _ in range(20):  # Redis is down: every flush is dropped, no step waits for it
            started = time.perf_counter()
            _train_step(model, optimizer)
            model.collect_telemetry()
            step_times.append(time.perf_counter() - started)
        sink.flush(timeout=10)
        assert sink.counters.dropped >= 15
        assert max(step_times) < 1.0  # far below a connect timeout: nothing blocked

        server = start_redis_server(port, tmp_path)
        deadline = time.monotonic() + 15
        published_before = sink.counters.published
        while sink.counters.published == published_before and time.monotonic() < deadline:
            _train_step(model, optimizer)
            model.collect_telemetry()
            time.sleep(0.05)
        assert sink.counters.published > published_before  # resumed after the restart
        subscription = open_bus(url, stream_prefix=prefix).subscribe(
            Topic.TELEMETRY_HEALTH, "check", "c", start="earliest"
        )
        batches = [d.decode(HealthSignalBatch) for d in subscription.poll(100, block_ms=1000)]
        assert batches and batches[-1].run_id == "faults"
    finally:
        sink.close(timeout=2)
        bus.close()
        server.terminate()
        server.wait(timeout=10)


def test_a_refused_artifact_fails_its_job_once_and_the_trainer_hears_at_once(
    tmp_path: Path,
) -> None:
    """Issue 9 item 8, end to end: ``esper urza serve --max-artifact-bytes`` below the size of
    the compiled kernel (but above its tensors, so the job is admitted): the worker compiles
    once, the library refuses the artifact, the job ends FAILED with the reason and
    ``kernel.failed`` is announced; the training side refuses the germination with that reason
    at the next step boundaries, the seed stays dormant (exact) and training goes on."""
    spec = BlueprintSpec(family="residual_mlp", params={"hidden": 32, "activation": "relu"})
    torch.manual_seed(0)
    host = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    target = linear_target(8, 16)
    data, metadata = create_artifact(spec, target)
    tensor_bytes = metadata.parameter_count * 4
    limit = (tensor_bytes + len(data)) // 2  # the tensors fit, the artifact does not

    token = "faults-token"
    with ServiceProcess(
        metadata_url=f"sqlite:///{tmp_path / 'urza.sqlite3'}",
        blob_url=str(tmp_path / "blobs"),
        token=token,
        options=["--max-artifact-bytes", str(limit)],
    ) as service:
        library = HttpUrza(service.url, token=token)
        bus = InProcessBus()
        failures = bus.subscribe(Topic.KERNEL_FAILED, "test", "t")
        model = esper.wrap(host, seeds_per_layer=2, kernel_source=UrzaArtifactSource(library))
        assert model.layer("0").target() == target
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        model.attach_optimizer(optimizer)
        worker = CompileWorker.start("thread", library, bus=bus)
        executor = GrowthExecutor(
            model,
            run_id="faults",
            library=library,
            bus=bus,
            evaluation_steps=5,
            # roomy: the kernel is refused by the library, not by the run's parameter budget
            safety=SafetyGates(SafetyConfig(max_parameter_fraction=1000.0)),
        )
        assert worker.thread is not None
        executor.submit(germinate("0", run_id="faults", blueprint=spec))
        refusals = []
        losses = []
        deadline = time.monotonic() + 120
        while not refusals and time.monotonic() < deadline:
            losses.append(_train_step(model, optimizer))
            refusals += executor.on_step(model.global_step, losses[-1]).refusals
            time.sleep(0.01)
        assert len(refusals) == 1, "the germination was never refused"
        refusal = refusals[0]
        assert refusal.gate == "compile_failed"
        assert "ArtifactTooLargeError" in refusal.reason and str(limit) in refusal.reason

        (job,) = library.list_jobs(blueprint_id=spec.blueprint_id)
        assert job.status is CompileJobStatus.FAILED and job.attempts == 1
        assert job.error is not None and job.error in refusal.reason
        assert (worker.thread.counters["compiled"], worker.thread.counters["refused"]) == (0, 1)
        assert [d.decode(KernelFailed).job_id for d in failures.poll()] == [job.job_id]

        layer = model.layer("0")
        assert list(layer.seed_states) == [SeedState.DORMANT, SeedState.DORMANT]
        x = torch.randn(4, 8)
        with torch.no_grad():
            assert torch.equal(layer(x), layer.base(x))  # the seed contributes exactly nothing
        for _ in range(5):  # and training simply goes on
            losses.append(_train_step(model, optimizer))
            executor.on_step(model.global_step, losses[-1])
        assert all(torch.isfinite(torch.tensor(losses)))
        assert library.claim_job("another-worker") is None  # nothing will be recompiled
        executor.close()
        worker.stop()
        library.close()
