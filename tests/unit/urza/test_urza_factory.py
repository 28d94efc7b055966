"""Opening a library from URLs and settings; ``import esper.urza`` stays free of backends."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from esper.errors import ConfigurationError
from esper.urza import HttpUrza, UrzaSettings, open_blob_store, open_library
from esper.urza.blob_stores import LocalBlobStore
from esper.urza.s3_blobs import S3BlobStore
from esper.urza.sql_schema import database_url
from esper.urza.storage_library import StorageLibrary


def test_import_esper_urza_imports_no_optional_backend() -> None:
    code = (
        "import sys, esper.urza\n"
        "heavy = ['sqlalchemy', 'psycopg', 'boto3', 'botocore', 'fastapi', 'starlette',\n"
        "         'uvicorn', 'httpx']\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"


def test_embedded_default_lives_in_the_run_folder(tmp_path: Path) -> None:
    library = open_library(run_dir=tmp_path / "run", settings=UrzaSettings())
    assert isinstance(library, StorageLibrary)
    assert library.metadata.url == f"sqlite:///{tmp_path / 'run' / 'urza.sqlite3'}"
    assert library.blobs.url == (tmp_path / "run" / "blobs").as_uri()
    assert (tmp_path / "run" / "urza.sqlite3").is_file()
    library.close()


def test_explicit_storage_urls(tmp_path: Path) -> None:
    library = open_library(
        metadata_url=f"sqlite:///{tmp_path}/meta/db.sqlite3",
        blob_url=(tmp_path / "objects").as_uri(),
        settings=UrzaSettings(),
    )
    assert isinstance(library, StorageLibrary)
    assert isinstance(library.blobs, LocalBlobStore)
    assert library.blobs.root == tmp_path / "objects"
    assert (tmp_path / "meta" / "db.sqlite3").is_file()
    library.close()


def test_single_http_url_opens_the_client_with_the_token_from_settings() -> None:
    settings = UrzaSettings(token="from-settings")
    library = open_library("http://127.0.0.1:1/", settings=settings)
    assert isinstance(library, HttpUrza)
    assert library.url == "http://127.0.0.1:1"
    assert library._headers == {"Authorization": "Bearer from-settings"}
    library.close()


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    environ = {
        "ESPER_URZA_URL": "https://urza.internal:8765",
        "ESPER_URZA_TOKEN": "s3cret",
        "ESPER_URZA_BLOB_URL": "",  # empty means unset
        "ESPER_URZA_RUN_DIR": "/data/urza",
    }
    settings = UrzaSettings.from_env(environ)
    assert settings.url == "https://urza.internal:8765"
    assert settings.token is not None and settings.token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)
    assert settings.blob_url is None and settings.run_dir == Path("/data/urza")

    monkeypatch.setenv("ESPER_URZA_URL", "http://127.0.0.1:9")
    library = open_library()
    assert isinstance(library, HttpUrza) and library.url == "http://127.0.0.1:9"
    library.close()


@pytest.mark.parametrize(
    ("kwargs", "accepted"),
    [
        ({"url": "ftp://example.com/urza"}, "http://"),
        ({"url": "sqlite:///x.sqlite3"}, "metadata_url"),
        ({"metadata_url": "mysql://root@db/urza"}, "postgresql"),
        ({"metadata_url": "sqlite://"}, "give a file"),
        ({"blob_url": "gs://bucket/kernels"}, "s3://"),
        ({"blob_url": "file://server/share"}, "three slashes"),
        ({"url": "http://x", "metadata_url": "sqlite:///y"}, "one or the other"),
    ],
)
def test_unknown_schemes_name_what_is_accepted(
    tmp_path: Path, kwargs: dict[str, str], accepted: str
) -> None:
    with pytest.raises(ConfigurationError, match=accepted):
        open_library(run_dir=tmp_path, settings=UrzaSettings(), **kwargs)  # type: ignore[arg-type]


def test_postgresql_urls_use_psycopg3() -> None:
    for url in ("postgresql://u@h:5432/db", "postgres://u@h/db", "postgresql+psycopg://u@h/db"):
        assert database_url(url).drivername == "postgresql+psycopg"


def test_s3_url_carries_bucket_prefix_and_endpoint() -> None:
    store = open_blob_store(
        "s3://kernels/team/a?endpoint_url=http://127.0.0.1:9000&region=eu-west-1"
    )
    assert isinstance(store, S3BlobStore)
    assert (store.bucket, store.prefix, store.endpoint_url) == (
        "kernels",
        "team/a",
        "http://127.0.0.1:9000",
    )
    assert store.object_key("a" * 64) == "team/a/" + "a" * 64
    with pytest.raises(ConfigurationError, match="unknown options"):
        open_blob_store("s3://kernels?endpoint=http://x")
    store.close()
