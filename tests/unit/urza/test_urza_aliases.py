"""Kernel aliases on the embedded library, through the HTTP service (in-process app + HttpUrza)
and the ``esper kernel tag`` / ``esper kernel aliases`` commands: set, moved only when asked,
listed, resolved unambiguously (and logged); ids, prefixes and names from outside are checked."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from esper import cli
from esper.contracts import KernelMetadata
from esper.errors import AmbiguousKernelNameError, ConfigurationError, KernelNotFoundError
from esper.urza import ArtifactLibrary, HttpUrza, create_app
from esper.urza.errors import AliasConflictError
from esper.urza.storage_library import StorageLibrary

TOKEN = "alias-test-token"
KernelFactory = Callable[..., tuple[bytes, KernelMetadata]]


@pytest.fixture(params=["embedded", "http"])
def any_library(
    request: pytest.FixtureRequest, library: StorageLibrary
) -> Iterator[ArtifactLibrary]:
    if request.param == "embedded":
        yield library
        return
    with TestClient(create_app(library, TOKEN)) as client:
        yield HttpUrza("http://testserver", token=TOKEN, client=client)


def _stored(library: ArtifactLibrary, make_kernel: KernelFactory, size: int) -> str:
    artifact, metadata = make_kernel(size)
    library.put_kernel(artifact, metadata)
    return metadata.kernel_id


def test_tag_resolve_and_list(any_library: ArtifactLibrary, make_kernel: KernelFactory) -> None:
    first = _stored(any_library, make_kernel, 3000)
    second = _stored(any_library, make_kernel, 3100)

    alias = any_library.tag_kernel("kernel-001", first)
    again = any_library.tag_kernel("kernel-001", first)  # the same tag: nothing changes
    any_library.tag_kernel("mnist.adapter:v2", second)

    assert (alias.name, alias.kernel_id) == ("kernel-001", first) and again == alias
    assert any_library.resolve_kernel("kernel-001") == first
    assert any_library.resolve_kernel(second[:8]) == second
    assert any_library.resolve_kernel(second) == second
    assert [a.name for a in any_library.list_aliases()] == ["kernel-001", "mnist.adapter:v2"]
    assert [a.name for a in any_library.list_aliases(kernel_id=second)] == ["mnist.adapter:v2"]
    assert len(any_library.list_aliases(limit=1)) == 1


def test_an_alias_moves_only_when_asked(
    any_library: ArtifactLibrary, make_kernel: KernelFactory
) -> None:
    first = _stored(any_library, make_kernel, 3000)
    second = _stored(any_library, make_kernel, 3100)
    any_library.tag_kernel("best", first)

    with pytest.raises(AliasConflictError, match=r"'best' already names kernel .*--move"):
        any_library.tag_kernel("best", second)
    assert any_library.resolve_kernel("best") == first

    moved = any_library.tag_kernel("best", second, move=True)
    assert moved.kernel_id == second == any_library.resolve_kernel("best")


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [
        ("nothing-here", KernelNotFoundError, "'nothing-here'"),
        ("abcdef99", KernelNotFoundError, "'abcdef99'"),
        ("abc", ConfigurationError, "'abc'"),
        ("../etc/passwd", ConfigurationError, "etc/passwd"),
        ("x" * 200, ConfigurationError, "1-128"),
    ],
)
def test_unknown_and_malformed_names_fail_naming_the_name(
    any_library: ArtifactLibrary, name: str, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        any_library.resolve_kernel(name)


@pytest.mark.parametrize("name", ["cafe01", "0" * 64, "-lead", "a b", "", "é"])
def test_names_that_could_be_read_otherwise_cannot_be_aliases(
    any_library: ArtifactLibrary, make_kernel: KernelFactory, name: str
) -> None:
    kernel_id = _stored(any_library, make_kernel, 3000)
    with pytest.raises(ConfigurationError):
        any_library.tag_kernel(name, kernel_id)
    assert any_library.list_aliases() == []


def test_tagging_needs_a_stored_kernel_and_a_valid_id(any_library: ArtifactLibrary) -> None:
    with pytest.raises(KernelNotFoundError, match="e" * 64):
        any_library.tag_kernel("kernel-001", "e" * 64)
    with pytest.raises(ConfigurationError):
        any_library.tag_kernel("kernel-001", "../../etc")


def test_an_ambiguous_prefix_is_refused_and_a_longer_one_resolves(
    library: StorageLibrary, make_kernel: KernelFactory
) -> None:
    _, metadata = make_kernel(3000)
    twins = ["abcdef12" + "0" * 56, "abcdef34" + "0" * 56]
    for twin in twins:  # rows only (the SQL layer stores what it is given): ids chosen here
        library.metadata.insert_kernel(
            metadata=metadata.model_copy(update={"kernel_id": twin}), now=0.0
        )

    with pytest.raises(AmbiguousKernelNameError, match=r"'abcdef'.*abcdef12.*abcdef34"):
        library.resolve_kernel("abcdef")
    assert library.resolve_kernel("abcdef3") == twins[1]


def test_resolution_and_moves_are_logged(
    library: StorageLibrary, make_kernel: KernelFactory, caplog: pytest.LogCaptureFixture
) -> None:
    first = _stored(library, make_kernel, 3000)
    second = _stored(library, make_kernel, 3100)
    library.tag_kernel("kernel-001", first)

    with caplog.at_level(logging.INFO, logger="esper.urza"):
        library.resolve_kernel("kernel-001")
        library.tag_kernel("kernel-001", second, move=True)

    messages = [r.getMessage() for r in caplog.records]
    assert any("'kernel-001' (alias) resolved to " + first in m for m in messages)
    assert any(f"moved from kernel {first} to {second}" in m for m in messages)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


def test_esper_kernel_tag_and_aliases(
    tmp_path: Path, make_kernel: KernelFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    from esper.urza import open_storage_library

    stored = open_storage_library(run_dir=tmp_path)
    first = _stored(stored, make_kernel, 3000)
    second = _stored(stored, make_kernel, 3100)
    stored.close()
    where = ["--run-dir", str(tmp_path)]

    assert _run(capsys, "kernel", "tag", "kernel-001", first[:10], *where) == (
        0,
        f"kernel-001 -> {first}",
    )
    code, out = _run(capsys, "kernel", "tag", "kernel-001", second, *where)
    assert code != 0 and "--move" in out
    code, out = _run(capsys, "kernel", "tag", "kernel-001", second, "--move", *where)
    assert (code, out) == (0, f"kernel-001 -> {second} (moved from {first})")
    code, out = _run(capsys, "kernel", "aliases", *where)
    assert code == 0 and "kernel-001" in out and second[:40] in out  # rich may cut the id
    code, out = _run(capsys, "kernel", "show", "kernel-001", *where)
    assert code == 0 and second in out
    code, out = _run(capsys, "kernel", "show", "kernel-404", *where)
    assert code != 0 and "'kernel-404'" in out
