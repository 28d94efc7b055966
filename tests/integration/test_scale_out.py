"""Scale-out: the team/cluster deployment shape, exercised with real processes and servers.

* Urza HTTP service over PostgreSQL + an S3-compatible store (moto), Redis Streams for Oona, two
  Tezzeret worker processes and two training processes sharing the library: one compile serves
  both trainers.
* A Tezzeret worker killed mid-compile: its job is reclaimed and finished by another worker.
* Fifty concurrent clients fetching kernels from the service: no errors, every byte verified.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from esper.blueprints import create_artifact, sha256_hex
from esper.contracts import BlueprintSpec, CompileJobStatus
from esper.urza import ArtifactLibrary, HttpUrza, ServiceProcess
from factories import linear_target

pytestmark = pytest.mark.services

TOKEN = "scale-out-token"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
TRAINER = Path(__file__).with_name("deployment_trainer.py")


@dataclass
class Stack:
    """The shared services: the Urza service and a Redis bus URL with a private stream prefix."""

    service: ServiceProcess
    bus_url: str
    env: dict[str, str]

    def library(self) -> ArtifactLibrary:
        return HttpUrza(self.service.url, token=TOKEN)

    def worker(self, worker_id: str, *extra: str) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "esper.cli", "tezzeret", "worker", "--urza"]
        command += [self.service.url, "--bus", self.bus_url, "--worker-id", worker_id, *extra]
        return subprocess.Popen(
            command, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )


@pytest.fixture
def stack(postgres_url: str, s3_bucket_url: str, redis_url: str) -> Iterator[Stack]:
    prefix = f"esper-scale-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **AWS_ENV, "ESPER_URZA_TOKEN": TOKEN}
    with ServiceProcess(
        metadata_url=postgres_url, blob_url=s3_bucket_url, token=TOKEN, env=AWS_ENV
    ) as service:
        yield Stack(service, f"{redis_url}?stream_prefix={prefix}", env)
    import redis

    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


def _wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        process.wait(timeout=30)


def test_two_workers_and_two_trainers_share_one_library(stack: Stack, tmp_path: Path) -> None:
    workers = [stack.worker("worker-a"), stack.worker("worker-b")]
    trainers: list[subprocess.Popen[bytes]] = []
    try:

        def trainer(run_id: str) -> subprocess.Popen[bytes]:
            command = [sys.executable, str(TRAINER), "--urza", stack.service.url]
            command += ["--bus", stack.bus_url, "--run-id", run_id, "--out", str(tmp_path)]
            return subprocess.Popen(command, env=stack.env, stderr=subprocess.PIPE)

        trainers.append(trainer("first"))
        _wait_for(lambda: (tmp_path / "first.requested").exists(), 120, "the first request")
        trainers.append(trainer("second"))
        for process in trainers:
            _, stderr = process.communicate(timeout=240)
            assert process.returncode == 0, stderr.decode()[-3000:]
    finally:
        _stop(workers + trainers)

    first, second = (json.loads((tmp_path / f"{r}.json").read_text()) for r in ("first", "second"))
    assert first["state"] == second["state"] == "ACTIVE"
    assert first["losses_finite"] and second["losses_finite"]
    assert first["kernel_id"] is not None and first["kernel_id"] == second["kernel_id"]
    assert not first["reused_compiled_kernel"]  # the first trainer's request was compiled
    # the second found the kernel compiled, or joined the compile already queued for it
    assert second["reused_compiled_kernel"] or second["job_id"] == first["job_id"]
    library = stack.library()
    stats = library.stats()
    assert stats.kernels == 1
    assert stats.jobs_by_status[CompileJobStatus.SUCCEEDED] == 1
    job = library.get_job(first["job_id"])
    assert job.worker_id in ("worker-a", "worker-b") and job.kernel_id == first["kernel_id"]
    library.close()


@pytest.mark.slow
def test_worker_killed_mid_compile_is_reclaimed_and_finished_by_another(stack: Stack) -> None:
    library = stack.library()
    # a blueprint big enough that compiling it (validate, export, time) takes seconds
    spec = BlueprintSpec(family="residual_mlp", params={"hidden": 8192})
    target = linear_target(2048, 2048)
    record = library.submit_blueprint(spec)
    job = library.enqueue_job(record.blueprint_id, target)
    doomed = stack.worker("doomed", "--lease-seconds", "3")
    survivor: subprocess.Popen[bytes] | None = None
    try:
        _wait_for(
            lambda: library.get_job(job.job_id).status is CompileJobStatus.CLAIMED,
            60,
            "the first worker to claim the job",
        )
        time.sleep(0.5)  # it is compiling now
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=10)
        claimed = library.get_job(job.job_id)
        assert claimed.status is CompileJobStatus.CLAIMED and claimed.worker_id == "doomed"

        survivor = stack.worker("survivor")
        _wait_for(
            lambda: library.get_job(job.job_id).status is CompileJobStatus.SUCCEEDED,
            240,
            "the second worker to reclaim and finish the job",
        )
    finally:
        _stop([doomed] + ([survivor] if survivor else []))
    finished = library.get_job(job.job_id)
    assert finished.worker_id == "survivor"
    assert finished.attempts == 2
    assert finished.kernel_id is not None
    assert sha256_hex(library.get_kernel_bytes(finished.kernel_id)) == finished.kernel_id
    library.close()


def test_fifty_concurrent_clients_fetch_kernels_without_errors(stack: Stack) -> None:
    library = stack.library()
    kernel_ids = []
    for rank in (16, 32, 48, 64):
        target = linear_target(512, 512)
        data, metadata = create_artifact(
            BlueprintSpec(family="lowrank_adapter", params={"rank": rank}), target
        )
        library.put_kernel(data, metadata)
        kernel_ids.append(metadata.kernel_id)
    library.close()

    fetches_per_client, clients = 10, 50
    errors: list[BaseException] = []
    fetched: list[str] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        own = HttpUrza(stack.service.url, token=TOKEN)
        rng = random.Random(seed)
        try:
            for _ in range(fetches_per_client):
                kernel_id = rng.choice(kernel_ids)
                data = own.get_kernel_bytes(kernel_id)  # digest-verified by the client
                with lock:
                    fetched.append(sha256_hex(data))
        except BaseException as exc:
            with lock:
                errors.append(exc)
        finally:
            own.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors[:3]
    assert len(fetched) == clients * fetches_per_client
    assert set(fetched) <= set(kernel_ids)
