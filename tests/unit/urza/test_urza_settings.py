"""Urza settings: read from the process environment by pydantic-settings (empty = unset, bad
values named by their variable), never read when built directly, importable without a server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from esper.errors import ConfigurationError
from esper.urza.settings import DEFAULT_RUN_DIR, ServiceLimits, UrzaEnvironment, UrzaSettings


def test_the_process_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPER_URZA_METADATA_URL", "postgresql://urza@db:5432/urza")
    monkeypatch.setenv("ESPER_URZA_BLOB_URL", "")  # empty: unset
    monkeypatch.setenv("ESPER_URZA_TOKEN", "t0ken")
    monkeypatch.setenv("ESPER_URZA_RUN_DIR", "/srv/urza")
    monkeypatch.setenv("ESPER_URZA_MAX_CONCURRENT_UPLOADS", "3")

    settings = UrzaSettings.from_env()

    assert settings.metadata_url == "postgresql://urza@db:5432/urza"
    assert settings.blob_url is None and settings.url is None
    assert settings.token is not None and settings.token.get_secret_value() == "t0ken"
    assert settings.run_dir == Path("/srv/urza")
    assert settings.limits == ServiceLimits(max_concurrent_uploads=3)
    assert "t0ken" not in repr(settings) + repr(UrzaEnvironment())


def test_a_bad_variable_is_named_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPER_URZA_MAX_REQUEST_BYTES", "lots")

    with pytest.raises(ConfigurationError, match="ESPER_URZA_MAX_REQUEST_BYTES: Input should be"):
        UrzaSettings.from_env()


def test_settings_built_directly_ignore_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPER_URZA_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("ESPER_URZA_RUN_DIR", "/elsewhere")

    assert UrzaSettings().url is None and UrzaSettings().run_dir == DEFAULT_RUN_DIR
    assert UrzaSettings.from_env({}).url is None  # a given mapping replaces the environment


def test_the_settings_import_no_backend_and_no_torch() -> None:
    probe = (
        "import sys, esper.urza.settings as s; s.UrzaSettings.from_env(); "
        "print(sorted(m for m in ('torch', 'sqlalchemy', 'fastapi', 'httpx', 'boto3') "
        "if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )

    assert done.stdout.strip() == "[]"


def test_command_line_options_replace_the_settings_they_are_named_after() -> None:
    settings = UrzaSettings(metadata_url="sqlite:///a.sqlite3", token="t")
    options = {"metadata_url": None, "blob_url": "file:///b", "run_dir": "/srv/x"}
    options |= {"max_concurrent_uploads": 3, "max_artifact_bytes": None, "port": 8765}

    updated = settings.with_options(options)

    assert updated.metadata_url == "sqlite:///a.sqlite3"  # None: kept
    assert (updated.blob_url, updated.run_dir) == ("file:///b", Path("/srv/x"))
    assert updated.limits == ServiceLimits(max_concurrent_uploads=3)
    assert updated.token == settings.token
    with pytest.raises(ConfigurationError, match="--max-concurrent-uploads"):
        settings.with_options({"max_concurrent_uploads": 0})
