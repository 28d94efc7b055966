"""Shared test fixtures: real PostgreSQL, Redis and an S3-compatible server.

Tests read the servers' URLs from ``ESPER_TEST_POSTGRES_URL`` and ``ESPER_TEST_REDIS_URL``
(defaults: the servers this project's machines and CI run on 127.0.0.1). When a server is not
reachable there, the test run starts its own from the installed binaries through pytest-postgresql
/ pytest-redis, so ``pytest`` needs nothing started by hand. No S3 server can be installed here, so
moto's standalone server stands in as the S3 protocol peer.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
from pytest_postgresql import factories as postgresql_factories
from pytest_redis import factories as redis_factories

from servers import free_port, wait_for_port

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

# Fallback servers, started only when a test asks for them (see the url fixtures below).
redis_proc = redis_factories.redis_proc(port=None)
postgresql_proc = postgresql_factories.postgresql_proc(
    port=None, executable=shutil.which("pg_ctl") or "/usr/lib/postgresql/15/bin/pg_ctl"
)


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> str:
    """URL of a real Redis server: the configured one, or one this test run starts."""
    url = os.environ.get("ESPER_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    if _reachable(url):
        return url
    proc = request.getfixturevalue("redis_proc")
    return f"redis://{proc.host}:{proc.port}/0"


@pytest.fixture(scope="session")
def postgres_server_url(request: pytest.FixtureRequest) -> str:
    """URL of a real PostgreSQL server's maintenance database."""
    url = os.environ.get("ESPER_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    if _reachable(url):
        return url
    proc = request.getfixturevalue("postgresql_proc")
    return f"postgresql://{proc.user}@{proc.host}:{proc.port}/{proc.dbname}"


@pytest.fixture
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database, dropped after the test."""
    import psycopg

    name = f"esper_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(postgres_server_url)
    yield urlunsplit(parts._replace(path=f"/{name}"))
    with psycopg.connect(postgres_server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def s3_endpoint_url() -> Iterator[str]:
    """Endpoint of moto's standalone S3-compatible server, in a subprocess, for the session."""
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def s3_bucket_url(s3_endpoint_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """An ``s3://`` URL of a fresh bucket on the S3-compatible server (endpoint in the URL query)."""
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"esper-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint_url, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    return f"s3://{bucket}/kernels?endpoint_url={s3_endpoint_url}"
