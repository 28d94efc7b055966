"""Issue 9 item 9 in-process: streamed uploads, pagination, settings, and error bodies that never
show where the embedded library's files are (the PostgreSQL + S3 side is in
``tests/integration/test_urza_service_limits.py``)."""

from __future__ import annotations

import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from sqlalchemy import insert
from starlette.testclient import TestClient

from esper.contracts import BlueprintSpec
from esper.errors import ConfigurationError
from esper.urza import HttpUrza, UrzaSettings, create_app
from esper.urza.api_models import METADATA_HEADER, encode_metadata_header
from esper.urza.blob_stores import LocalBlobStore
from esper.urza.pagination import MAX_PAGE_SIZE
from esper.urza.settings import ServiceLimits
from esper.urza.sql_schema import blueprints_table
from esper.urza.storage_library import StorageLibrary
from servers import free_port

TOKEN = "unit-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(library: StorageLibrary) -> Iterator[TestClient]:
    with TestClient(create_app(library, TOKEN), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def remote(client: TestClient) -> HttpUrza:
    return HttpUrza("http://testserver", token=TOKEN, client=client)


class _ThreadServer:
    """uvicorn serving an app on a thread of this process (so its memory can be traced)."""

    def __init__(self, library: StorageLibrary, limits: ServiceLimits) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            create_app(library, TOKEN, limits=limits),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.server.started
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def test_an_upload_is_streamed_to_a_temporary_file_not_held_in_memory(
    library: StorageLibrary, make_kernel
) -> None:
    size = 24 * 1024 * 1024
    artifact, metadata = make_kernel(size)
    view = memoryview(artifact)

    def body() -> Iterator[bytes]:  # the client holds no copy of its own either
        for start in range(0, size, 256 * 1024):
            yield bytes(view[start : start + 256 * 1024])

    with _ThreadServer(library, ServiceLimits()) as url:
        headers = {**AUTH, METADATA_HEADER: encode_metadata_header(metadata)}
        headers["Content-Length"] = str(size)
        tracemalloc.start()
        try:
            response = httpx.put(
                f"{url}/kernels/{metadata.kernel_id}", content=body(), headers=headers, timeout=60
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert response.status_code == 200, response.text
    assert library.get_kernel_bytes(metadata.kernel_id) == artifact
    # Held in memory whole (let alone twice), the upload alone would peak above 24 MiB.
    assert peak < size // 4, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB upload"


def test_lists_page_through_more_than_one_page(
    library: StorageLibrary, remote: HttpUrza, client: TestClient
) -> None:
    rows = [
        {
            "blueprint_id": spec.blueprint_id,
            "spec_json": spec.canonical_json(),
            "status": "submitted",
            "created_at": float(i),
        }
        for i, spec in enumerate(
            BlueprintSpec(family="residual_mlp", params={"hidden": hidden})
            for hidden in range(1, MAX_PAGE_SIZE + 42)
        )
    ]
    with library.metadata.engine.begin() as conn:
        conn.execute(insert(blueprints_table), rows)
    ids = [row["blueprint_id"] for row in rows]

    assert [r.blueprint_id for r in library.list_blueprints()] == ids
    assert [r.blueprint_id for r in remote.list_blueprints()] == ids  # two requests
    assert [r.blueprint_id for r in remote.list_blueprints(limit=3, offset=5)] == ids[5:8]
    assert [r.blueprint_id for r in library.list_blueprints(limit=3, offset=5)] == ids[5:8]
    one_page = client.get("/blueprints", headers=AUTH)
    assert len(one_page.json()) == MAX_PAGE_SIZE  # the service never answers more at once
    assert client.get("/blueprints?limit=1001", headers=AUTH).status_code == 422
    for limit, offset in ((0, 0), (MAX_PAGE_SIZE + 1, 0), (5, -1), (True, 0)):
        with pytest.raises(ConfigurationError):
            library.list_blueprints(limit=limit, offset=offset)
        with pytest.raises(ConfigurationError):
            library.list_jobs(limit=limit, offset=offset)
        with pytest.raises(ConfigurationError):
            library.find_kernels(limit=limit, offset=offset)


def test_kernel_search_and_jobs_paginate(
    library: StorageLibrary, remote: HttpUrza, make_kernel, spec: BlueprintSpec, linear_target
) -> None:
    for _ in range(4):
        library.put_kernel(*make_kernel(1000))
    stored = library.find_kernels()
    assert (
        remote.find_kernels(limit=2, offset=1)
        == stored[1:3]
        == library.find_kernels(limit=2, offset=1)
    )
    blueprint_id = library.submit_blueprint(spec).blueprint_id
    for seed in range(4):
        library.enqueue_job(blueprint_id, linear_target(), init_seed=seed)
    jobs = library.list_jobs()
    assert len(jobs) == 4
    assert remote.list_jobs(limit=2, offset=2) == jobs[2:] == library.list_jobs(limit=3, offset=2)


def test_limits_come_from_the_environment_with_clear_errors() -> None:
    settings = UrzaSettings.from_env(
        {"ESPER_URZA_MAX_ARTIFACT_BYTES": "1000", "ESPER_URZA_MAX_CONCURRENT_UPLOADS": "2"}
    )
    assert settings.limits.max_artifact_bytes == 1000
    assert settings.limits.max_concurrent_uploads == 2
    with pytest.raises(ConfigurationError, match="ESPER_URZA_MAX_ARTIFACT_BYTES"):
        UrzaSettings.from_env({"ESPER_URZA_MAX_ARTIFACT_BYTES": "-5"})
    with pytest.raises(ConfigurationError, match="--max-concurrent-uploads"):
        ServiceLimits().updated(max_concurrent_uploads=0)
    assert ServiceLimits().updated(max_artifact_bytes=None) == ServiceLimits()


def test_json_bodies_are_limited(library: StorageLibrary) -> None:
    limits = ServiceLimits(max_request_bytes=2048)
    with TestClient(create_app(library, TOKEN, limits=limits)) as client:
        big = {"spec": {"family": "residual_mlp", "params": {"hidden": 8}}, "name": "x" * 3000}
        response = client.post("/blueprints", json=big, headers=AUTH)
        assert response.status_code == 413 and "max_request_bytes" in response.json()["detail"]
        assert library.list_blueprints() == []
        small = {"spec": {"family": "residual_mlp", "params": {"hidden": 8}}, "name": "small"}
        assert client.post("/blueprints", json=small, headers=AUTH).status_code == 200
        # Unauthenticated bodies are refused before they are read.
        assert client.post("/blueprints", json=big).status_code == 401


def _assert_no_location(text: str, library: StorageLibrary, tmp_path: Path) -> None:
    assert str(tmp_path) not in text and "sqlite" not in text and "file://" not in text, text
    for location in library.locations():
        assert location not in text, (location, text)


def test_error_bodies_show_no_file_path_or_database_url(
    library: StorageLibrary, client: TestClient, make_kernel, tmp_path: Path
) -> None:
    for path in (f"/kernels/{'f' * 64}", f"/kernels/{'f' * 64}/metadata"):
        response = client.get(path, headers=AUTH)
        assert response.status_code == 404
        assert response.json()["error"] == "KernelNotFoundError"
        _assert_no_location(response.text, library, tmp_path)

    artifact, metadata = make_kernel(2000)
    assert isinstance(library.blobs, LocalBlobStore)
    shard = library.blobs.root / metadata.kernel_id[:2]
    shard.write_bytes(b"")  # the blob folder is broken: a file where a folder goes
    headers = {**AUTH, METADATA_HEADER: encode_metadata_header(metadata)}
    response = client.put(f"/kernels/{metadata.kernel_id}", content=artifact, headers=headers)
    assert response.status_code == 500 and response.json()["error"] == "ServiceError"
    _assert_no_location(response.text, library, tmp_path)
    shard.unlink()

    with library.metadata.engine.begin() as conn:  # the database is broken
        conn.exec_driver_sql("ALTER TABLE urza_kernels RENAME TO urza_kernels_away")
    response = client.post("/kernels/search", json={}, headers=AUTH)
    assert response.status_code == 500 and "reference" in response.json()["detail"]
    _assert_no_location(response.text, library, tmp_path)
