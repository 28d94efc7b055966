"""One interface, three backends: the same library tests on SQLite + folder, PostgreSQL + S3, and
the HTTP service (an ``esper urza serve`` subprocess over PostgreSQL + S3) through HttpUrza;
then what only the service does: bearer tokens, id checks on raw requests, streamed downloads,
its OpenAPI schema, and clear errors when it cannot be reached.

The service process is shared by the module, so every test here works on its own blueprints and
kernels (random content) and measures statistics as differences.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import boto3
import httpx
import psycopg
import pytest

from esper.blueprints import create_artifact
from esper.contracts import (
    BlueprintSpec,
    BlueprintStatus,
    CompileJobStatus,
    KernelMetadata,
    KernelTarget,
)
from esper.errors import (
    ArtifactFormatError,
    ArtifactIntegrityError,
    ConfigurationError,
    KernelNotFoundError,
)
from esper.urza import (
    ArtifactLibrary,
    AuthenticationError,
    BlueprintNotFoundError,
    HttpUrza,
    JobStateError,
    LibraryUnavailableError,
    ServiceProcess,
    open_blob_store,
    open_storage_library,
)
from esper.urza.blob_stores import LocalBlobStore
from esper.urza.errors import KernelMetadataMismatchError
from esper.urza.storage_library import StorageLibrary
from factories import linear_target as linear
from factories import sized_artifact

pytestmark = pytest.mark.services

TOKEN = "integration-test-token"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class Backend:
    """A library under test and a way to damage one of its stored artifacts."""

    name: str
    library: ArtifactLibrary
    corrupt: Callable[[str, bytes], None]


_HIDDEN_WIDTHS = itertools.count(random.randrange(1, 30_000))
"""Widths no other spec of this test run has: a spec of its own for each test on the shared service."""


def unique_spec() -> BlueprintSpec:
    """A valid blueprint no other test of this run submits (the service checks specs)."""
    return BlueprintSpec(family="residual_mlp", params={"hidden": next(_HIDDEN_WIDTHS)})


def make_kernel(
    size: int = 4096, *, spec: BlueprintSpec | None = None, target: KernelTarget | None = None
) -> tuple[bytes, KernelMetadata]:
    """A well-formed kernel artifact of exactly ``size`` bytes with random float32 weights, and
    the metadata that describes it (of a blueprint of its own unless ``spec`` is given)."""
    return sized_artifact(size, blueprint=spec or unique_spec(), target=target or linear())


def unused_port() -> int:
    """A port on 127.0.0.1 nothing listens on (not imported from conftest: its name is shared)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def drain_queue(library: ArtifactLibrary) -> None:
    """Fail every claimable job, so a test starts from an empty queue on a shared service."""
    while (job := library.claim_job("drain", lease_seconds=3600)) is not None:
        library.fail_job(job.job_id, "drain", "drained by a test")


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def service_storage(postgres_server_url: str, s3_endpoint_url: str) -> Iterator[tuple[str, str]]:
    """A PostgreSQL database and an S3 bucket for the module's service process."""
    name = f"esper_urza_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    bucket = f"esper-urza-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint_url, **_boto_credentials()).create_bucket(
        Bucket=bucket
    )
    parts = urlsplit(postgres_server_url)
    yield (
        urlunsplit(parts._replace(path=f"/{name}")),
        f"s3://{bucket}/kernels?endpoint_url={s3_endpoint_url}",
    )
    with psycopg.connect(postgres_server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": AWS_ENV["AWS_DEFAULT_REGION"],
    }


@pytest.fixture(scope="module")
def urza_service(service_storage: tuple[str, str]) -> Iterator[ServiceProcess]:
    """``esper urza serve`` on a free port over PostgreSQL + S3."""
    metadata_url, blob_url = service_storage
    with ServiceProcess(
        metadata_url=metadata_url, blob_url=blob_url, token=TOKEN, env=AWS_ENV
    ) as service:
        yield service


def _overwrite_object(blob_url: str) -> Callable[[str, bytes], None]:
    def corrupt(kernel_id: str, data: bytes) -> None:
        store = open_blob_store(blob_url)
        store.put(kernel_id, data)  # a blob store trusts its caller: no digest check on put
        store.close()

    return corrupt


@pytest.fixture(params=["sqlite+folder", "postgresql+s3", "http-service"])
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backend]:
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    if request.param == "sqlite+folder":
        library = open_storage_library(run_dir=tmp_path)
        assert isinstance(library, StorageLibrary) and isinstance(library.blobs, LocalBlobStore)
        blobs = library.blobs

        def corrupt(kernel_id: str, data: bytes) -> None:
            blobs.path_for(kernel_id).write_bytes(data)

        yield Backend(request.param, library, corrupt)
    elif request.param == "postgresql+s3":
        blob_url = request.getfixturevalue("s3_bucket_url")
        library = open_storage_library(
            metadata_url=request.getfixturevalue("postgres_url"), blob_url=blob_url
        )
        yield Backend(request.param, library, _overwrite_object(blob_url))
    else:
        service: ServiceProcess = request.getfixturevalue("urza_service")
        library = HttpUrza(service.url, token=TOKEN)
        yield Backend(request.param, library, _overwrite_object(service.blob_url))
    library.close()


# ---------------------------------------------------------------------------------------------
# The interface, on every backend


def test_blueprints_are_idempotent_and_change_status(backend: Backend) -> None:
    library = backend.library
    spec = unique_spec()
    first = library.submit_blueprint(spec)
    again = library.submit_blueprint(spec, name="wide")

    assert again.blueprint_id == first.blueprint_id == spec.blueprint_id
    assert again.created_at == first.created_at and again.name == "wide"
    invalid = library.set_blueprint_status(spec.blueprint_id, BlueprintStatus.INVALID, "NaN")
    assert (invalid.status, invalid.reason) == (BlueprintStatus.INVALID, "NaN")
    assert library.get_blueprint(spec.blueprint_id) == invalid
    assert invalid in library.list_blueprints(BlueprintStatus.INVALID)
    assert invalid not in library.list_blueprints(BlueprintStatus.SUBMITTED)
    with pytest.raises(BlueprintNotFoundError):
        library.get_blueprint("0" * 64)


def test_kernel_round_trip_and_idempotent_put(backend: Backend) -> None:
    library = backend.library
    before = library.stats()
    artifact, metadata = make_kernel(300_001)

    assert library.put_kernel(artifact, metadata) == metadata
    assert library.put_kernel(artifact, metadata) == metadata
    chunks = list(library.iter_kernel_chunks(metadata.kernel_id, chunk_size=100_000))

    assert library.get_kernel_bytes(metadata.kernel_id) == artifact
    assert b"".join(chunks) == artifact and len(chunks) >= 3
    assert library.get_kernel_metadata(metadata.kernel_id) == metadata
    after = library.stats()
    assert after.kernels - before.kernels == 1
    assert after.kernel_bytes - before.kernel_bytes == 300_001


def test_unknown_kernels_and_bad_puts(backend: Backend) -> None:
    library = backend.library
    with pytest.raises(KernelNotFoundError):
        library.get_kernel_bytes("e" * 64)
    with pytest.raises(KernelNotFoundError):
        library.get_kernel_metadata("e" * 64)
    with pytest.raises(ConfigurationError):
        library.get_kernel_bytes("../../etc/passwd")

    artifact, metadata = make_kernel(2000)
    with pytest.raises(ArtifactIntegrityError, match="size_bytes=2000"):
        library.put_kernel(artifact[:-1], metadata)
    with pytest.raises(ArtifactIntegrityError, match=metadata.kernel_id):
        library.put_kernel(bytes([artifact[0] ^ 0x01]) + artifact[1:], metadata)  # always differs
    with pytest.raises(KernelNotFoundError):
        library.get_kernel_metadata(metadata.kernel_id)


def test_corrupted_artifact_is_detected_on_read(backend: Backend) -> None:
    library = backend.library
    artifact, metadata = make_kernel(50_000)
    library.put_kernel(artifact, metadata)
    damaged = artifact[:25_000] + bytes([artifact[25_000] ^ 0x10]) + artifact[25_001:]

    backend.corrupt(metadata.kernel_id, damaged)

    with pytest.raises(ArtifactIntegrityError) as caught:
        library.get_kernel_bytes(metadata.kernel_id)
    assert metadata.kernel_id in str(caught.value)
    assert hashlib.sha256(damaged).hexdigest() in str(caught.value)
    with pytest.raises(ArtifactIntegrityError):
        b"".join(library.iter_kernel_chunks(metadata.kernel_id))
    library.put_kernel(artifact, metadata)  # a put repairs the stored copy
    assert library.get_kernel_bytes(metadata.kernel_id) == artifact


def test_find_kernels_by_blueprint_target_and_device(backend: Backend) -> None:
    library = backend.library
    spec = unique_spec()
    cpu = make_kernel(spec=spec, target=linear(24, 12))
    cuda = make_kernel(spec=spec, target=linear(24, 12, device="cuda"))
    other_shape = make_kernel(spec=spec, target=linear(12, 24))
    for artifact, metadata in (cpu, cuda, other_shape):
        library.put_kernel(artifact, metadata)

    def ids(found: list[KernelMetadata]) -> set[str]:
        return {m.kernel_id for m in found}

    assert ids(library.find_kernels(blueprint_id=spec.blueprint_id)) == {
        cpu[1].kernel_id,
        cuda[1].kernel_id,
        other_shape[1].kernel_id,
    }
    assert ids(library.find_kernels(blueprint_id=spec.blueprint_id, target=linear(24, 12))) == {
        cpu[1].kernel_id,
        cuda[1].kernel_id,
    }
    assert ids(
        library.find_kernels(blueprint_id=spec.blueprint_id, target=linear(24, 12), device="cuda")
    ) == {cuda[1].kernel_id}
    assert library.find_kernels(blueprint_id=spec.blueprint_id, dtype="float16") == []


def test_job_lifecycle(backend: Backend) -> None:
    library = backend.library
    drain_queue(library)
    spec = unique_spec()
    library.submit_blueprint(spec)
    target = linear()
    job = library.enqueue_job(spec.blueprint_id, target, init_seed=1)
    assert library.enqueue_job(spec.blueprint_id, target, init_seed=1).job_id == job.job_id

    claimed = library.claim_job("worker-1", lease_seconds=60)
    assert claimed is not None and claimed.job_id == job.job_id
    assert (claimed.status, claimed.attempts, claimed.worker_id) == (
        CompileJobStatus.CLAIMED,
        1,
        "worker-1",
    )
    assert library.claim_job("worker-2", lease_seconds=60) is None

    artifact, metadata = make_kernel(spec=spec, target=target)
    library.put_kernel(artifact, metadata)
    with pytest.raises(JobStateError):
        library.complete_job(job.job_id, "worker-2", metadata.kernel_id)
    done = library.complete_job(job.job_id, "worker-1", metadata.kernel_id)

    assert (done.status, done.kernel_id) == (CompileJobStatus.SUCCEEDED, metadata.kernel_id)
    assert library.get_job(job.job_id) == done
    assert library.list_jobs(blueprint_id=spec.blueprint_id) == [done]
    assert library.get_blueprint(spec.blueprint_id).status is BlueprintStatus.VALID


def test_lapsed_lease_is_reclaimed(backend: Backend) -> None:
    library = backend.library
    drain_queue(library)
    spec = unique_spec()
    library.submit_blueprint(spec)
    job = library.enqueue_job(spec.blueprint_id, linear())
    first = library.claim_job("crashes", lease_seconds=0.4)
    assert first is not None and first.job_id == job.job_id
    assert library.claim_job("rescuer", lease_seconds=60) is None

    time.sleep(0.6)
    reclaimed = library.claim_job("rescuer", lease_seconds=60)

    assert reclaimed is not None and reclaimed.job_id == job.job_id
    assert (reclaimed.worker_id, reclaimed.attempts) == ("rescuer", 2)
    failed = library.fail_job(job.job_id, "rescuer", "out of memory")
    assert (failed.status, failed.error) == (CompileJobStatus.FAILED, "out of memory")
    with pytest.raises(JobStateError):
        library.fail_job(job.job_id, "crashes", "late report")


def test_stats_count_what_was_added(backend: Backend) -> None:
    library = backend.library
    drain_queue(library)
    before = library.stats()
    spec = unique_spec()
    library.submit_blueprint(spec)
    for seed in range(3):
        library.enqueue_job(spec.blueprint_id, linear(), init_seed=seed)
    library.put_kernel(*make_kernel(1234))  # registers one more blueprint

    after = library.stats()
    assert (
        after.blueprints_by_status[BlueprintStatus.SUBMITTED]
        - before.blueprints_by_status[BlueprintStatus.SUBMITTED]
    ) == 2
    assert (
        after.jobs_by_status[CompileJobStatus.QUEUED]
        - before.jobs_by_status[CompileJobStatus.QUEUED]
        == 3
    )
    assert (after.kernels - before.kernels, after.kernel_bytes - before.kernel_bytes) == (1, 1234)
    drain_queue(library)


def test_every_backend_refuses_metadata_that_does_not_describe_the_bytes(
    backend: Backend,
) -> None:
    """Issue 9 item 7, on SQLite + folder, PostgreSQL + S3 and the HTTP service."""
    library = backend.library
    spec = unique_spec()
    data, real = create_artifact(spec, linear())
    before = library.stats()

    mislabelled = real.model_copy(
        update={
            "blueprint": BlueprintSpec(family="lowrank_adapter", params={"rank": 4}),
            "parameter_count": 1,
        }
    )
    with pytest.raises(KernelMetadataMismatchError, match="parameter_count"):
        library.put_kernel(data, mislabelled)
    junk = os.urandom(len(data))
    with pytest.raises(ArtifactFormatError, match="not an Esper kernel artifact"):
        library.put_kernel(
            junk, real.model_copy(update={"kernel_id": hashlib.sha256(junk).hexdigest()})
        )

    after = library.stats()
    assert (after.kernels, after.kernel_bytes) == (before.kernels, before.kernel_bytes)
    assert library.find_kernels(blueprint_id=spec.blueprint_id) == []
    with pytest.raises(KernelNotFoundError):
        library.get_kernel_bytes(real.kernel_id)
    assert library.put_kernel(data, real) == real  # the truthful put is stored


# ---------------------------------------------------------------------------------------------
# What only the service does


def test_missing_or_wrong_token_is_401(urza_service: ServiceProcess) -> None:
    url = f"{urza_service.url}/stats"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert httpx.get(f"{urza_service.url}/healthz").status_code == 200
    with (
        HttpUrza(urza_service.url, token="wrong") as library,
        pytest.raises(AuthenticationError, match="ESPER_URZA_TOKEN"),
    ):
        library.list_blueprints()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/kernels/../../etc/passwd"),
        ("GET", "/kernels/..%2F..%2Fetc%2Fpasswd"),
        ("PUT", "/kernels/../../tmp/pwned"),
        ("GET", "/kernels/../../etc/passwd/metadata"),
        ("GET", "/blueprints/../../etc/passwd"),
        ("POST", "/jobs/../../etc/passwd/complete"),
        ("GET", "/jobs?blueprint_id=../../etc/passwd"),
    ],
)
def test_traversal_style_ids_are_rejected(
    urza_service: ServiceProcess, method: str, path: str
) -> None:
    # http.client sends the path verbatim (httpx would remove the dot segments first).
    conn = http.client.HTTPConnection(urza_service.host, urza_service.port, timeout=10)
    try:
        conn.request(method, path, body=b"x", headers={"Authorization": f"Bearer {TOKEN}"})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status == 422, body


def test_download_is_streamed_and_exact(urza_service: ServiceProcess) -> None:
    artifact, metadata = make_kernel(3_000_017)
    with HttpUrza(urza_service.url, token=TOKEN) as library:
        library.put_kernel(artifact, metadata)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.stream(
        "GET", f"{urza_service.url}/kernels/{metadata.kernel_id}", headers=headers
    ) as response:
        assert response.status_code == 200
        assert response.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in response.headers
        assert response.headers["x-esper-kernel-id"] == metadata.kernel_id
        chunks = list(response.iter_raw())
    assert b"".join(chunks) == artifact
    assert len(chunks) > 1


def test_openapi_schema_is_served(urza_service: ServiceProcess) -> None:
    assert httpx.get(f"{urza_service.url}/openapi.json").status_code == 401
    response = httpx.get(
        f"{urza_service.url}/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    schema = response.json()
    assert response.status_code == 200 and schema["info"]["title"] == "Urza"
    assert {"/kernels/{kernel_id}", "/jobs/claim", "/blueprints"} <= set(schema["paths"])


def test_unreachable_service_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{unused_port()}"
    with HttpUrza(url, token=TOKEN, timeout=2.0) as library:
        with pytest.raises(LibraryUnavailableError, match="running") as caught:
            library.stats()
        assert url in str(caught.value)
        with pytest.raises(LibraryUnavailableError, match=url):
            library.get_kernel_bytes("a" * 64)


def test_four_http_claimers_each_get_distinct_jobs(urza_service: ServiceProcess) -> None:
    jobs_count, claimers = 20, 4
    setup = HttpUrza(urza_service.url, token=TOKEN)
    drain_queue(setup)
    spec = unique_spec()
    setup.submit_blueprint(spec)
    queued = {
        setup.enqueue_job(spec.blueprint_id, linear(), init_seed=s).job_id
        for s in range(jobs_count)
    }
    claimed: list[str] = []
    lock = threading.Lock()

    def claim_all(worker_id: str) -> None:
        with HttpUrza(urza_service.url, token=TOKEN) as library:
            while (job := library.claim_job(worker_id, lease_seconds=300)) is not None:
                with lock:
                    claimed.append(job.job_id)

    threads = [threading.Thread(target=claim_all, args=(f"w{i}",)) for i in range(claimers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sorted(claimed) == sorted(queued)  # every job once, none twice
    drain_queue(setup)
    for job_id in queued:
        job = setup.get_job(job_id)
        setup.fail_job(job_id, job.worker_id or "", "cleanup")
    setup.close()
