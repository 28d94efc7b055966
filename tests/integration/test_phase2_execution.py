"""Phase 2 end to end: Tezzeret -> Urza -> Kasmina, with telemetry on Oona.

A blueprint is submitted, a Tezzeret worker compiles it, Urza stores it, a wrapped model in
training loads it into a seed through the kernel cache (without blocking its steps), the output
equals ``base + alpha * kernel`` computed by hand, gradients reach the kernel, and the model's
health signals arrive on the bus.

Run twice:

* **embedded**: SQLite + local folder + in-process bus, worker on a thread; no servers.
* **served**: the Urza HTTP service in a subprocess over real PostgreSQL and an S3-compatible
  server (moto), the Tezzeret worker as an ``esper tezzeret worker`` subprocess, and the bus on
  real Redis Streams.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import esper
from esper.contracts import (
    BlueprintSpec,
    BlueprintStatus,
    HealthSignalBatch,
    KernelReady,
    SeedState,
    Topic,
)
from esper.oona import MessageBus, OonaTelemetrySink, open_bus
from esper.tezzeret import TezzeretWorker, find_or_enqueue
from esper.urza import ArtifactLibrary, UrzaArtifactSource, open_library

TOKEN = "phase2-test-token"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class Pipeline:
    """The library, the bus, and how to run one compile worker for a deployment shape."""

    library: ArtifactLibrary
    bus: MessageBus
    run_worker: object  # () -> None: compile what is queued, then return


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Pipeline]:
    library = open_library(
        metadata_url=f"sqlite:///{tmp_path}/urza.sqlite3", blob_url=f"file://{tmp_path}/blobs"
    )
    bus = open_bus("memory://")

    def run_worker() -> None:
        worker = TezzeretWorker(library, bus).start()  # its own thread, never the training one
        deadline = time.monotonic() + 60
        while worker.counters["compiled"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        worker.stop()

    yield Pipeline(library, bus, run_worker)
    bus.close()
    library.close()


@pytest.fixture
def served(
    postgres_url: str, s3_bucket_url: str, redis_url: str, tmp_path: Path
) -> Iterator[Pipeline]:
    from esper.urza import HttpUrza, ServiceProcess

    prefix = f"esper-phase2-{uuid.uuid4().hex[:8]}"
    bus_url = f"{redis_url}?stream_prefix={prefix}"
    env = {**os.environ, **AWS_ENV, "ESPER_URZA_TOKEN": TOKEN}
    with ServiceProcess(
        metadata_url=postgres_url, blob_url=s3_bucket_url, token=TOKEN, env=AWS_ENV
    ) as service:
        library = HttpUrza(service.url, token=TOKEN)
        bus = open_bus(bus_url)

        def run_worker() -> None:
            command = [sys.executable, "-m", "esper.cli", "tezzeret", "worker"]
            command += ["--urza", service.url, "--bus", bus_url, "--max-jobs", "1"]
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr

        yield Pipeline(library, bus, run_worker)
        bus.close()
        library.close()
    import redis

    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


def _host() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def run_phase2(pipeline: Pipeline) -> None:
    library, bus = pipeline.library, pipeline.bus
    health = bus.subscribe(Topic.TELEMETRY_HEALTH, "phase2", "test")
    ready = bus.subscribe(Topic.KERNEL_READY, "phase2", "test")
    sink = OonaTelemetrySink(bus, run_id="phase2")
    model = esper.wrap(
        _host(),
        kernel_source=UrzaArtifactSource(library),
        telemetry_sink=sink,
        blend_steps=4,
        health_every=1,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.attach_optimizer(optimizer, lr=0.05)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))

    def train_step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.step()

    # 1. submit a blueprint for the first layer's geometry; 2. a worker compiles it
    spec = BlueprintSpec(family="residual_mlp", params={"hidden": 8, "activation": "tanh"})
    request = find_or_enqueue(library, spec, model.layer("0").target())
    assert request.job is not None and not request.ready
    pipeline.run_worker()

    # 3. Urza stores it, and kernel.ready announces it
    deliveries = ready.poll(max_messages=10, block_ms=5000)
    announced = [d.decode(KernelReady) for d in deliveries]
    ready.ack(*deliveries)
    assert [a.job_id for a in announced] == [request.job.job_id]
    kernel_id = announced[0].kernel_id
    assert library.get_job(request.job.job_id).kernel_id == kernel_id
    assert library.get_blueprint(request.blueprint_id).status is BlueprintStatus.VALID
    assert library.get_kernel_metadata(kernel_id).characterization is not None

    # 4. a model in training loads it into a seed through the cache, without blocking steps
    train_step()
    model.request_kernel("0", seed_idx=1, kernel_artifact_id=kernel_id)
    assert model.seed_state("0", 1) is SeedState.LOADING
    deadline = time.monotonic() + 30
    while model.seed_state("0", 1) is SeedState.LOADING and time.monotonic() < deadline:
        train_step()  # training goes on while the kernel is fetched
    assert model.seed_state("0", 1) is SeedState.BLENDING
    for _ in range(2):
        train_step()
    layer = model.layer("0")
    kernel = layer.kernel(1)
    assert kernel is not None
    assert model.kernel_cache.stats().misses == 1

    # 5. the output equals base + alpha * kernel, computed by hand
    alpha = layer.seed_layout.slots[1].alpha
    assert 0.0 < alpha < 1.0
    assert float(layer.seed_layout.alpha[1]) == pytest.approx(alpha)
    with torch.no_grad():
        head = model.layer("2").base  # wrap() deep-copied the host: use the trained modules
        hidden = layer.base(x) + alpha * kernel(x)  # (64, 32)
        torch.testing.assert_close(model(x), head(torch.relu(hidden)))
        assert not torch.allclose(model(x), head(torch.relu(layer.base(x))))

    # 6. gradients reach the kernel and the optimizer updates it
    before = [p.detach().clone() for p in kernel.parameters()]
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in kernel.parameters())
    optimizer.step()
    optimizer.zero_grad()
    assert any(not torch.equal(b, p) for b, p in zip(before, kernel.parameters(), strict=True))

    # 7. health signals arrive on the bus
    nn.functional.cross_entropy(model(x), y).backward()
    signals = model.collect_telemetry()
    assert sink.flush(timeout=10)
    batches = []
    deadline = time.monotonic() + 10
    while not batches and time.monotonic() < deadline:
        deliveries = health.poll(max_messages=50, block_ms=500)
        batches += [d.decode(HealthSignalBatch) for d in deliveries]
        health.ack(*deliveries)
    assert batches, "no health signals arrived on telemetry.health"
    latest = batches[-1]
    assert latest.run_id == "phase2"
    assert [s.layer_name for s in latest.signals] == ["0", "2"] == [s.layer_name for s in signals]
    seed = latest.signals[0].seeds[1]
    assert seed.kernel_id == kernel_id
    assert seed.state in (SeedState.BLENDING, SeedState.ACTIVE)
    assert latest.signals[0].samples >= 1 and latest.signals[0].grad_norm is not None
    sink.close()
    model.kernel_cache.close()


def test_phase2_embedded(embedded: Pipeline) -> None:
    run_phase2(embedded)


@pytest.mark.services
def test_phase2_served(served: Pipeline) -> None:
    run_phase2(served)
