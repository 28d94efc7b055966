"""Issue 9 items 7 and 9 against the real service: ``esper urza serve`` over PostgreSQL + S3.

Bad input is answered with a clear 4xx and never reaches PostgreSQL (out-of-range integers used
to return 500 and reset the keep-alive connection); blueprints are checked against the registry
and compile jobs against the kernel size limits at submission; request bodies, uploads and
uploads at once are bounded; lists paginate; and no error body shows where the storage is.
Every exchange that should leave the connection usable is checked on one ``http.client``
connection: the next request must go out on the same socket.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import itertools
import json
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import boto3
import httpx
import psycopg
import pytest

from esper.blueprints import create_artifact
from esper.contracts import BlueprintSpec
from esper.errors import BlueprintError, ConfigurationError
from esper.tezzeret import find_or_enqueue
from esper.urza import HttpUrza, ServiceProcess
from esper.urza.api_models import METADATA_HEADER, encode_metadata_header
from esper.urza.errors import (
    ArtifactTooLargeError,
    JobRefusedError,
    KernelMetadataMismatchError,
    LibraryBusyError,
)
from factories import linear_target as linear

pytestmark = pytest.mark.services

TOKEN = "limits-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
MAX_ARTIFACT_BYTES = 65_536
MAX_KERNEL_PARAMETERS = 20_000
MAX_REQUEST_BYTES = 4096
_WIDTHS = itertools.count(random.randrange(600))


def small_spec() -> BlueprintSpec:
    """A blueprint no other test here submits, whose 16->8 kernel fits every limit
    (25 * hidden + 8 parameters, at most 15,008)."""
    return BlueprintSpec(family="residual_mlp", params={"hidden": 1 + next(_WIDTHS) % 600})


@pytest.fixture(scope="module")
def storage(postgres_server_url: str, s3_endpoint_url: str) -> Iterator[dict[str, str]]:
    name = f"esper_limits_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    bucket = f"esper-limits-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint_url, region_name="us-east-1", **_keys())
    s3.create_bucket(Bucket=bucket)
    parts = urlsplit(postgres_server_url)
    yield {
        "metadata_url": urlunsplit(parts._replace(path=f"/{name}")),
        "blob_url": f"s3://{bucket}/kernels?endpoint_url={s3_endpoint_url}",
        "bucket": bucket,
        "endpoint": s3_endpoint_url,
        "database": name,
        "db_host": f"{parts.hostname}:{parts.port}",
    }
    with psycopg.connect(postgres_server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _keys() -> dict[str, str]:
    return {
        "aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"],
    }


@pytest.fixture(scope="module")
def service(storage: dict[str, str]) -> Iterator[ServiceProcess]:
    """``esper urza serve`` with small limits (flags and environment)."""
    with ServiceProcess(
        metadata_url=storage["metadata_url"],
        blob_url=storage["blob_url"],
        token=TOKEN,
        env={**AWS_ENV, "ESPER_URZA_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES)},
        options=[
            "--max-artifact-bytes",
            str(MAX_ARTIFACT_BYTES),
            "--max-concurrent-uploads",
            "1",
            "--max-kernel-parameters",
            str(MAX_KERNEL_PARAMETERS),
        ],
    ) as process:
        yield process


@pytest.fixture
def remote(service: ServiceProcess) -> Iterator[HttpUrza]:
    with HttpUrza(service.url, token=TOKEN) as library:
        yield library


class KeepAlive:
    """One HTTP/1.1 connection; every request must go out on the same socket."""

    def __init__(self, service: ServiceProcess) -> None:
        self.conn = http.client.HTTPConnection(service.host, service.port, timeout=30)
        self.conn.connect()
        self.local = self.conn.sock.getsockname()

    def send(
        self, method: str, path: str, body: bytes | None = None, **headers: str
    ) -> tuple[int, dict[str, Any] | None]:
        sock = self.conn.sock
        assert sock is not None and sock.getsockname() == self.local, "connection was closed"
        self.conn.request(method, path, body=body, headers={**AUTH, **headers})
        response = self.conn.getresponse()
        raw = response.read()
        assert response.getheader("connection") != "close", (response.status, raw[:300])
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        return response.status, parsed if isinstance(parsed, dict) else None

    def json(self, method: str, path: str, data: Any) -> tuple[int, dict[str, Any] | None]:
        return self.send(
            method, path, json.dumps(data).encode(), **{"Content-Type": "application/json"}
        )

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def keep_alive(service: ServiceProcess) -> Iterator[KeepAlive]:
    connection = KeepAlive(service)
    yield connection
    connection.close()


def _target_json(**overrides: Any) -> dict[str, Any]:
    return {**linear().model_dump(mode="json"), **overrides}


def _raw_metadata_header(**overrides: Any) -> str:
    """A metadata header built as JSON, so it can hold values the contracts refuse."""
    _, metadata = create_artifact(small_spec(), linear())
    fields = {**metadata.model_dump(mode="json"), **overrides}
    return base64.urlsafe_b64encode(json.dumps(fields).encode()).decode()


# ---------------------------------------------------------------------------------------------
# Bounds (item 9): 4xx, never 500, and the connection survives


def test_out_of_range_values_are_refused_and_the_connection_stays_open(
    keep_alive: KeepAlive, remote: HttpUrza
) -> None:
    spec = small_spec()
    blueprint_id = remote.submit_blueprint(spec).blueprint_id
    bad_requests = [
        (
            "POST",
            "/jobs",
            {"blueprint_id": blueprint_id, "target": _target_json(), "init_seed": 2**70},
        ),
        (
            "POST",
            "/jobs",
            {"blueprint_id": blueprint_id, "target": _target_json(), "init_seed": -1},
        ),
        (
            "POST",
            "/jobs",
            {"blueprint_id": blueprint_id, "target": _target_json(in_features=10**12)},
        ),
        ("POST", "/kernels/search", {"target": _target_json(out_features=2**40)}),
        ("POST", "/kernels/search", {"device": "cpu\x00"}),
        ("POST", "/blueprints", {"spec": spec.model_dump(), "name": "a\x00b"}),
        ("POST", "/blueprints", {"spec": {"family": "residual_mlp", "params": {"hidden": 2**70}}}),
        ("POST", "/jobs/claim", {"worker_id": "w" * 201, "lease_seconds": 10}),
        ("POST", "/jobs/claim", {"worker_id": "w", "lease_seconds": 1e300}),
        ("PUT", f"/blueprints/{blueprint_id}/status", {"status": "invalid", "reason": "x\x00"}),
    ]
    for method, path, body in bad_requests:
        status, answer = keep_alive.json(method, path, body)
        assert status == 422, (path, body, status, answer)

    header = _raw_metadata_header(init_seed=2**70)
    status, _ = keep_alive.send(
        "PUT", f"/kernels/{'a' * 64}", b"x" * 100, **{METADATA_HEADER: header}
    )
    assert status == 422
    for query in ("limit=100000", "limit=0", "offset=-1", f"offset={2**70}"):
        assert keep_alive.send("GET", f"/jobs?{query}")[0] == 422
        assert keep_alive.send("GET", f"/blueprints?{query}")[0] == 422
    assert keep_alive.send("GET", "/stats")[0] == 200  # same socket, still usable

    with pytest.raises(ConfigurationError, match="init_seed"):
        remote.enqueue_job(blueprint_id, linear(), init_seed=2**70)
    assert remote.list_jobs(blueprint_id=blueprint_id) == []


# ---------------------------------------------------------------------------------------------
# Admission (item 9): the registry and the kernel size limits


def test_blueprints_are_checked_against_the_registry(
    keep_alive: KeepAlive, remote: HttpUrza
) -> None:
    with pytest.raises(BlueprintError, match="known families"):
        remote.submit_blueprint(BlueprintSpec(family="no_such_family"))
    with pytest.raises(BlueprintError, match="hidden"):
        remote.submit_blueprint(BlueprintSpec(family="residual_mlp", params={"hidden": 0}))
    with pytest.raises(BlueprintError, match="nonce"):
        remote.submit_blueprint(BlueprintSpec(family="residual_mlp", params={"nonce": "x"}))
    assert keep_alive.json("POST", "/blueprints", {"spec": {"family": "x" * 10}})[0] == 422
    assert remote.submit_blueprint(small_spec()).status.value == "submitted"


def test_request_bodies_are_limited(keep_alive: KeepAlive, service: ServiceProcess) -> None:
    spec = {"family": "residual_mlp", "params": {"hidden": 8}}
    padded = json.dumps({"spec": spec, "name": "x" * 200}).encode() + b" " * MAX_REQUEST_BYTES
    status, answer = keep_alive.send(
        "POST", "/blueprints", padded, **{"Content-Type": "application/json"}
    )
    assert status == 413 and answer is not None and "max_request_bytes" in answer["detail"]
    assert keep_alive.send("GET", "/stats")[0] == 200  # the refused body was drained

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        yield padded[:1000]
        yield padded[1000:]

    response = httpx.post(
        f"{service.url}/blueprints",
        content=chunks(),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert response.status_code == 413


def test_compile_jobs_over_the_kernel_limits_are_refused_at_submission(remote: HttpUrza) -> None:
    many_parameters = BlueprintSpec(family="residual_mlp", params={"hidden": 4096})
    with pytest.raises(JobRefusedError, match="max_kernel_parameters") as caught:
        find_or_enqueue(remote, many_parameters, linear(64, 64))
    assert "528,448 parameters" in str(caught.value)
    # 129 * 139 + 64 = 17,995 parameters fit, but 71,980 bytes of float32 do not.
    too_many_bytes = BlueprintSpec(family="residual_mlp", params={"hidden": 139})
    with pytest.raises(JobRefusedError, match="max_artifact_bytes"):
        find_or_enqueue(remote, too_many_bytes, linear(64, 64))
    with pytest.raises(BlueprintError, match="channels-first"):
        find_or_enqueue(remote, BlueprintSpec(family="conv_adapter"), linear())
    assert remote.list_jobs(blueprint_id=many_parameters.blueprint_id) == []
    accepted = find_or_enqueue(remote, small_spec(), linear())
    assert accepted.job is not None and accepted.job.status.value == "queued"
    job = remote.claim_job("limits-test", lease_seconds=60)
    assert job is not None
    remote.fail_job(job.job_id, "limits-test", "cleanup")


# ---------------------------------------------------------------------------------------------
# Uploads (items 7 and 9)


def _big_artifact() -> tuple[bytes, Any]:
    spec = BlueprintSpec(family="lowrank_adapter", params={"rank": 64})
    data, metadata = create_artifact(spec, linear(256, 256))  # 32,768 parameters, 128 KiB
    assert metadata.size_bytes > MAX_ARTIFACT_BYTES
    return data, metadata


def test_uploads_over_the_limits_are_413_and_the_connection_stays_open(
    keep_alive: KeepAlive, remote: HttpUrza
) -> None:
    data, metadata = _big_artifact()
    header = {METADATA_HEADER: encode_metadata_header(metadata)}
    status, answer = keep_alive.send("PUT", f"/kernels/{metadata.kernel_id}", data, **header)
    assert status == 413 and answer is not None
    assert (
        answer["error"] == "ArtifactTooLargeError" and str(MAX_ARTIFACT_BYTES) in answer["detail"]
    )
    with pytest.raises(ArtifactTooLargeError, match="nothing was sent"):
        remote.put_kernel(data, metadata)  # the client knows the limit and sends nothing

    small, small_metadata = create_artifact(small_spec(), linear())
    many = small_metadata.model_copy(update={"parameter_count": MAX_KERNEL_PARAMETERS + 1})
    header = {METADATA_HEADER: encode_metadata_header(many)}
    status, answer = keep_alive.send("PUT", f"/kernels/{many.kernel_id}", small, **header)
    assert status == 413 and answer is not None and "max_kernel_parameters" in answer["detail"]

    header = {METADATA_HEADER: encode_metadata_header(small_metadata)}
    status, _ = keep_alive.send("PUT", f"/kernels/{small_metadata.kernel_id}", small[:-1], **header)
    assert status == 422  # shorter than size_bytes
    status, _ = keep_alive.send("PUT", f"/kernels/{small_metadata.kernel_id}", small, **header)
    assert status == 200
    assert remote.get_kernel_bytes(small_metadata.kernel_id) == small


def test_metadata_that_does_not_describe_the_bytes_is_422(keep_alive: KeepAlive) -> None:
    data, metadata = create_artifact(small_spec(), linear())
    forged = metadata.model_copy(update={"parameter_count": 1})
    header = {METADATA_HEADER: encode_metadata_header(forged)}
    status, answer = keep_alive.send("PUT", f"/kernels/{metadata.kernel_id}", data, **header)
    assert status == 422 and answer is not None
    assert answer["error"] == KernelMetadataMismatchError.__name__
    junk = os.urandom(len(data))
    junk_metadata = metadata.model_copy(update={"kernel_id": hashlib.sha256(junk).hexdigest()})
    header = {METADATA_HEADER: encode_metadata_header(junk_metadata)}
    status, answer = keep_alive.send("PUT", f"/kernels/{junk_metadata.kernel_id}", junk, **header)
    assert status == 422 and answer is not None and answer["error"] == "ArtifactFormatError"


def test_one_upload_at_a_time_and_the_next_is_told_to_retry(
    service: ServiceProcess, remote: HttpUrza
) -> None:
    data, metadata = create_artifact(small_spec(), linear())
    slow = socket.create_connection((service.host, service.port), timeout=30)
    head = (
        f"PUT /kernels/{metadata.kernel_id} HTTP/1.1\r\nHost: {service.host}\r\n"
        f"Authorization: Bearer {TOKEN}\r\n{METADATA_HEADER}: {encode_metadata_header(metadata)}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    slow.sendall(head + data[:100])  # the upload holds the only slot until its body ends
    deadline = time.monotonic() + 20
    busy = None
    while busy is None and time.monotonic() < deadline:
        # Until the slow upload's head has reached the service, a probe may go through.
        probe, probe_metadata = create_artifact(small_spec(), linear())
        try:
            remote.put_kernel(probe, probe_metadata)
        except LibraryBusyError as error:
            busy = error
        time.sleep(0.02)
    assert busy is not None and "max_concurrent_uploads" in str(busy)

    slow.sendall(data[100:])
    reply = slow.recv(65536).split(b"\r\n", 1)[0]
    slow.close()
    assert b"200" in reply
    other, other_metadata = create_artifact(small_spec(), linear())
    assert remote.put_kernel(other, other_metadata) == other_metadata  # the slot is free again


# ---------------------------------------------------------------------------------------------
# Pagination (item 9)


def test_list_endpoints_paginate(keep_alive: KeepAlive, remote: HttpUrza) -> None:
    specs = [small_spec() for _ in range(5)]
    for spec in specs:
        remote.submit_blueprint(spec)
    everything = [r.blueprint_id for r in remote.list_blueprints()]
    tail = everything[-5:]
    assert tail == [s.blueprint_id for s in specs]
    offset = len(everything) - 5
    page = remote.list_blueprints(limit=2, offset=offset + 1)
    assert [r.blueprint_id for r in page] == tail[1:3]
    assert remote.list_blueprints(limit=10, offset=len(everything)) == []
    status, _ = keep_alive.send("GET", "/blueprints?limit=1001")
    assert status == 422
    with pytest.raises(ConfigurationError, match="limit"):
        remote.list_jobs(limit=1001)


# ---------------------------------------------------------------------------------------------
# Error bodies (item 9): no database URL, host, bucket or endpoint


def _assert_reveals_nothing(text: str, storage: dict[str, str]) -> None:
    for secret in (
        storage["metadata_url"],
        storage["database"],
        storage["db_host"],
        storage["bucket"],
        storage["endpoint"],
        "postgresql",
        "s3://",
    ):
        assert secret not in text, (secret, text)


def test_error_bodies_reveal_no_storage_location(
    keep_alive: KeepAlive, storage: dict[str, str], postgres_server_url: str
) -> None:
    for path in (f"/kernels/{'f' * 64}", f"/kernels/{'f' * 64}/metadata"):
        status, answer = keep_alive.send("GET", path)
        assert status == 404 and answer is not None and answer["error"] == "KernelNotFoundError"
        _assert_reveals_nothing(answer["detail"], storage)

    # The database fails: a 500 with a log reference, and the connection survives.
    parts = urlsplit(postgres_server_url)
    db_url = urlunsplit(parts._replace(path=f"/{storage['database']}"))
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE urza_compile_jobs RENAME TO urza_jobs_away")
        try:
            status, answer = keep_alive.send("GET", "/jobs")
        finally:
            conn.execute("ALTER TABLE urza_jobs_away RENAME TO urza_compile_jobs")
    assert status == 500 and answer is not None and answer["error"] == "ServiceError"
    assert "reference" in answer["detail"]
    _assert_reveals_nothing(json.dumps(answer), storage)
    assert keep_alive.send("GET", "/jobs")[0] == 200

    # The blob store fails (its bucket is gone): the same.
    s3 = boto3.client("s3", endpoint_url=storage["endpoint"], region_name="us-east-1", **_keys())
    data, metadata = create_artifact(small_spec(), linear())
    for item in s3.list_objects_v2(Bucket=storage["bucket"]).get("Contents", []):
        s3.delete_object(Bucket=storage["bucket"], Key=item["Key"])
    s3.delete_bucket(Bucket=storage["bucket"])
    try:
        header = {METADATA_HEADER: encode_metadata_header(metadata)}
        status, answer = keep_alive.send("PUT", f"/kernels/{metadata.kernel_id}", data, **header)
    finally:
        s3.create_bucket(Bucket=storage["bucket"])
    assert status == 500 and answer is not None and answer["error"] == "ServiceError"
    _assert_reveals_nothing(json.dumps(answer), storage)
    assert keep_alive.send("PUT", f"/kernels/{metadata.kernel_id}", data, **header)[0] == 200
