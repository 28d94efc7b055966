"""The HTTP service in-process (Starlette's test client): auth, id checks, streaming, errors."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from starlette.testclient import TestClient

from esper.contracts import BlueprintSpec, CompileJobStatus
from esper.errors import ArtifactIntegrityError, ConfigurationError, KernelNotFoundError
from esper.urza import (
    AuthenticationError,
    BlueprintNotFoundError,
    HttpUrza,
    JobStateError,
    create_app,
)
from esper.urza.api_models import METADATA_HEADER, encode_metadata_header
from esper.urza.blob_stores import LocalBlobStore
from esper.urza.storage_library import StorageLibrary

TOKEN = "unit-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(library: StorageLibrary) -> Iterator[TestClient]:
    with TestClient(create_app(library, TOKEN), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def remote(client: TestClient) -> HttpUrza:
    """The HTTP client of the library, talking to the in-process app."""
    return HttpUrza("http://testserver", token=TOKEN, client=client)


def _concrete(path: str) -> str:
    values = {"kernel_id": "a" * 64, "blueprint_id": "b" * 64, "job_id": "c" * 32, "name": "k-1"}
    return re.sub(r"\{(\w+)(?::path)?\}", lambda m: values[m.group(1)], path)


def test_healthz_needs_no_token(client: TestClient) -> None:
    response = client.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_every_other_route_requires_the_bearer_token(client: TestClient) -> None:
    routes = [
        (method, _concrete(route.path))
        for route in client.app.routes  # type: ignore[attr-defined]
        if isinstance(route, APIRoute) and route.path != "/healthz"
        for method in route.methods
    ]
    assert len(routes) >= 17
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            response = client.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, headers)
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert "ESPER_URZA_TOKEN" in response.json()["detail"]


def test_token_is_checked_before_routing_and_body_parsing(client: TestClient) -> None:
    garbage = client.post(
        "/blueprints", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert garbage.status_code == 401  # not 422: nothing is parsed for a stranger
    assert client.get("/no/such/route").status_code == 401  # not 404
    assert client.delete("/stats").status_code == 401  # not 405
    assert client.get("/no/such/route", headers=AUTH).status_code == 404


def test_openapi_schema_is_served_to_token_holders(client: TestClient) -> None:
    assert client.get("/openapi.json").status_code == 401
    schema = client.get("/openapi.json", headers=AUTH).json()
    assert schema["info"]["title"] == "Urza"
    assert {"/kernels/{kernel_id}/metadata", "/jobs/claim", "/stats"} <= set(schema["paths"])
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert client.get("/docs", headers=AUTH).status_code == 404  # no unauthenticated UI


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/kernels/..%2F..%2Fetc%2Fpasswd"),
        ("GET", "/kernels/%2e%2e%2f%2e%2e%2fetc%2fpasswd/metadata"),
        ("GET", "/kernels/" + "A" * 64),
        ("PUT", "/kernels/..%2F..%2Ftmp%2Fpwned"),
        ("GET", "/blueprints/..%2F..%2Fetc%2Fpasswd"),
        ("GET", "/jobs/..%2F..%2Fetc%2Fpasswd"),
        ("POST", "/jobs/..%2F..%2Fx/complete"),
        ("PUT", "/blueprints/..%2F..%2Fetc%2Fpasswd/status"),
        ("GET", "/jobs?blueprint_id=../../etc/passwd"),
    ],
)
def test_traversal_style_ids_are_rejected(
    client: TestClient, library: StorageLibrary, tmp_path: Path, method: str, path: str
) -> None:
    before = sorted(tmp_path.rglob("*"))
    response = client.request(method, path, headers=AUTH)
    assert response.status_code == 422, response.text
    assert sorted(tmp_path.rglob("*")) == before


def test_search_body_ids_are_checked(client: TestClient) -> None:
    response = client.post("/kernels/search", json={"blueprint_id": "../../etc"}, headers=AUTH)
    assert response.status_code == 422


def test_streamed_download_returns_the_exact_bytes(
    client: TestClient, library: StorageLibrary, make_kernel
) -> None:
    artifact, metadata = make_kernel(1_000_003)
    library.put_kernel(artifact, metadata)
    with client.stream("GET", f"/kernels/{metadata.kernel_id}", headers=AUTH) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/octet-stream"
        assert response.headers["x-esper-kernel-id"] == metadata.kernel_id
        received = b"".join(response.iter_bytes())
    assert received == artifact


def test_http_client_round_trip_and_error_classes(
    remote: HttpUrza, spec: BlueprintSpec, make_kernel, linear_target
) -> None:
    artifact, metadata = make_kernel(50_000, blueprint=spec)
    assert remote.put_kernel(artifact, metadata) == metadata
    assert remote.get_kernel_bytes(metadata.kernel_id) == artifact
    assert b"".join(remote.iter_kernel_chunks(metadata.kernel_id, chunk_size=8192)) == artifact
    assert remote.find_kernels(target=linear_target()) == [metadata]
    blueprint_id = spec.blueprint_id
    job = remote.enqueue_job(blueprint_id, linear_target())
    claimed = remote.claim_job("http-worker", lease_seconds=60)
    assert claimed is not None and claimed.job_id == job.job_id
    assert remote.claim_job("http-worker") is None

    with pytest.raises(JobStateError, match="http-worker"):
        remote.complete_job(job.job_id, "intruder", metadata.kernel_id)
    done = remote.complete_job(job.job_id, "http-worker", metadata.kernel_id)
    assert done.status is CompileJobStatus.SUCCEEDED
    with pytest.raises(KernelNotFoundError):
        remote.get_kernel_bytes("d" * 64)
    with pytest.raises(KernelNotFoundError):
        remote.get_kernel_metadata("d" * 64)
    with pytest.raises(BlueprintNotFoundError):
        remote.get_blueprint("d" * 64)
    with pytest.raises(ConfigurationError, match="worker_id"):
        remote.claim_job("")
    tampered = bytes([artifact[0] ^ 1]) + artifact[1:]
    with pytest.raises(ArtifactIntegrityError, match=hashlib.sha256(tampered).hexdigest()):
        remote.put_kernel(tampered, metadata)


def test_wrong_token_tells_to_set_the_environment_variable(client: TestClient) -> None:
    library = HttpUrza("http://testserver", token="nope", client=client)
    with pytest.raises(AuthenticationError, match="ESPER_URZA_TOKEN"):
        library.stats()


def test_corrupted_blob_is_caught_by_the_client(
    remote: HttpUrza, library: StorageLibrary, make_kernel
) -> None:
    artifact, metadata = make_kernel(20_000)
    library.put_kernel(artifact, metadata)
    assert isinstance(library.blobs, LocalBlobStore)
    path = library.blobs.path_for(metadata.kernel_id)
    path.write_bytes(artifact[:-1] + bytes([artifact[-1] ^ 0x80]))

    with pytest.raises(ArtifactIntegrityError, match=metadata.kernel_id):
        remote.get_kernel_bytes(metadata.kernel_id)


def test_upload_checks_header_path_and_length(
    client: TestClient, library: StorageLibrary, make_kernel
) -> None:
    artifact, metadata = make_kernel(1000)
    _, other = make_kernel(1000)
    url = f"/kernels/{metadata.kernel_id}"
    header = {METADATA_HEADER: encode_metadata_header(metadata), **AUTH}

    missing = client.put(url, content=artifact, headers=AUTH)
    mismatch = client.put(f"/kernels/{other.kernel_id}", content=artifact, headers=header)
    garbled = client.put(url, content=artifact, headers={**header, METADATA_HEADER: "%%%"})
    too_long = client.put(url, content=artifact + b"extra", headers=header)

    assert missing.status_code == 422
    assert mismatch.status_code == 422 and "names" in mismatch.json()["detail"]
    assert garbled.status_code == 422
    assert too_long.status_code == 422
    assert too_long.json()["error"] == "ArtifactIntegrityError"
    assert library.stats().kernels == 0
    ok = client.put(url, content=artifact, headers=header)
    assert ok.status_code == 200 and ok.json()["kernel_id"] == metadata.kernel_id


def test_service_refuses_to_start_without_a_token(library: StorageLibrary) -> None:
    with pytest.raises(ConfigurationError, match="ESPER_URZA_TOKEN"):
        create_app(library, "")
