"""Schema versions and the kernel lookup index: a library made with the first schema (no version
table, no ``init_seed`` column, only ``blueprint_id`` indexed) is upgraded in place when opened,
its rows intact; a new library starts at the current version; a kernel lookup that hits sends
reads only; a library from a newer Esper is refused. On SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    inspect,
    text,
)

import factories
from esper.contracts import BlueprintSpec, BlueprintStatus, KernelMetadata
from esper.errors import ConfigurationError
from esper.tezzeret import find_or_enqueue
from esper.urza import open_storage_library
from esper.urza.sql_metadata import SqlMetadataStore
from esper.urza.sql_migrations import SCHEMA_VERSION, schema_version
from esper.urza.sql_schema import database_url
from esper.urza.storage_library import StorageLibrary

SPEC = BlueprintSpec(family="residual_mlp", params={"hidden": 8})


def _first_schema() -> MetaData:
    """The tables as the first schema created them (before versions were recorded)."""
    old = MetaData()
    Table(
        "urza_blueprints",
        old,
        Column("blueprint_id", String(64), primary_key=True),
        Column("spec_json", Text, nullable=False),
        Column("name", String(200)),
        Column("status", String(16), nullable=False, index=True),
        Column("reason", Text),
        Column("created_at", Float, nullable=False),
    )
    Table(
        "urza_kernels",
        old,
        Column("kernel_id", String(64), primary_key=True),
        Column("blueprint_id", String(64), nullable=False, index=True),
        Column("in_features", Integer, nullable=False),
        Column("out_features", Integer, nullable=False),
        Column("channel_dim", Integer, nullable=False),
        Column("spatial_dims", Integer, nullable=False),
        Column("device", String(64), nullable=False),
        Column("dtype", String(32), nullable=False),
        Column("size_bytes", BigInteger, nullable=False),
        Column("metadata_json", Text, nullable=False),
        Column("created_at", Float, nullable=False),
    )
    Table(
        "urza_compile_jobs",
        old,
        Column("job_id", String(32), primary_key=True),
        Column("blueprint_id", String(64), nullable=False, index=True),
        Column("target_json", Text, nullable=False),
        Column("init_seed", BigInteger, nullable=False),
        Column("status", String(16), nullable=False, index=True),
        Column("attempts", Integer, nullable=False),
        Column("worker_id", String(200)),
        Column("claimed_at", Float),
        Column("lease_expires_at", Float),
        Column("kernel_id", String(64)),
        Column("error", Text),
        Column("created_at", Float, nullable=False, index=True),
    )
    return old


@pytest.fixture(params=["sqlite", "postgresql"])
def metadata_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'urza.sqlite3'}"
    else:
        yield request.getfixturevalue("postgres_url")


def _engine(url: str) -> Engine:
    return create_engine(database_url(url))


def _kernels(count: int) -> list[KernelMetadata]:
    """Metadata of ``count`` kernels of one blueprint: two geometries, seeds 0..count/2."""
    kernels = []
    for i in range(count):
        target = factories.linear_target(16, 8 if i % 2 else 4)
        _, metadata = factories.sized_artifact(
            2048, blueprint=SPEC, target=target, init_seed=i // 2
        )
        kernels.append(metadata)
    return kernels


def _make_first_schema_library(url: str, kernels: list[KernelMetadata]) -> None:
    """A library as the first schema's code left it: its tables and rows, written directly."""
    engine = _engine(url)
    old = _first_schema()
    old.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            old.tables["urza_blueprints"].insert(),
            [
                {
                    "blueprint_id": SPEC.blueprint_id,
                    "spec_json": SPEC.canonical_json(),
                    "name": "old",
                    "status": BlueprintStatus.SUBMITTED.value,
                    "created_at": 1.0,
                }
            ],
        )
        conn.execute(
            old.tables["urza_kernels"].insert(),
            [
                {
                    "kernel_id": m.kernel_id,
                    "blueprint_id": SPEC.blueprint_id,
                    "in_features": m.target.in_features,
                    "out_features": m.target.out_features,
                    "channel_dim": m.target.channel_dim,
                    "spatial_dims": m.target.spatial_dims,
                    "device": m.target.device,
                    "dtype": m.dtype,
                    "size_bytes": m.size_bytes,
                    "metadata_json": m.model_dump_json(),
                    "created_at": float(i),
                }
                for i, m in enumerate(kernels)
            ],
        )
    engine.dispose()


def _index_names(engine: Engine) -> set[str]:
    return {index["name"] or "" for index in inspect(engine).get_indexes("urza_kernels")}


def test_a_first_schema_library_is_upgraded_in_place_with_its_rows_intact(
    metadata_url: str,
) -> None:
    kernels = _kernels(12)
    _make_first_schema_library(metadata_url, kernels)
    engine = _engine(metadata_url)
    with engine.connect() as conn:
        assert schema_version(conn) == 1
    assert "ix_urza_kernels_lookup" not in _index_names(engine)

    store = SqlMetadataStore(metadata_url)
    try:
        with engine.connect() as conn:
            assert schema_version(conn) == SCHEMA_VERSION
        assert "ix_urza_kernels_lookup" in _index_names(engine)
        assert store.get_blueprint(blueprint_id=SPEC.blueprint_id).name == "old"  # type: ignore[union-attr]
        everything = store.find_kernels(blueprint_id=None, target=None, device=None, dtype=None)
        assert everything == kernels  # every row, oldest first, metadata unchanged
        for seed in (0, 3, 5):
            found = store.find_kernels(
                blueprint_id=SPEC.blueprint_id,
                target=kernels[1].target,
                device="cpu",
                dtype="float32",
                init_seed=seed,
            )
            assert found == [kernels[2 * seed + 1]]  # the seed column was filled from metadata
    finally:
        store.close()
        engine.dispose()
    SqlMetadataStore(metadata_url).close()  # a second open finds it current and changes nothing
    engine = _engine(metadata_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT version FROM urza_schema_version")).scalars().all()
    engine.dispose()
    assert sorted(rows) == [2]


def test_a_new_library_starts_at_the_current_version_with_the_index(metadata_url: str) -> None:
    SqlMetadataStore(metadata_url).close()
    engine = _engine(metadata_url)
    with engine.connect() as conn:
        assert schema_version(conn) == SCHEMA_VERSION
    assert "ix_urza_kernels_lookup" in _index_names(engine)
    engine.dispose()


def test_a_library_from_a_newer_esper_is_refused(metadata_url: str) -> None:
    SqlMetadataStore(metadata_url).close()
    engine = _engine(metadata_url)
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO urza_schema_version (version, applied_at) VALUES (:v, :t)"),
            {"v": SCHEMA_VERSION + 1, "t": time.time()},
        )
    engine.dispose()
    with pytest.raises(ConfigurationError, match="newer than this Esper reads"):
        SqlMetadataStore(metadata_url)


def test_a_kernel_lookup_that_hits_sends_no_writes(metadata_url: str, tmp_path: Path) -> None:
    library = open_storage_library(metadata_url=metadata_url, blob_url=str(tmp_path / "blobs"))
    assert isinstance(library, StorageLibrary)
    try:
        target = factories.linear_target(16, 8)
        for seed in range(4):
            data, metadata = factories.sized_artifact(
                2048, blueprint=SPEC, target=target, init_seed=seed
            )
            library.put_kernel(data, metadata)
        statements: list[str] = []

        def record(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
            statements.append(statement.strip().split()[0].upper())

        event.listen(library.metadata.engine, "before_cursor_execute", record)
        request = find_or_enqueue(library, SPEC, target, init_seed=2)
        event.remove(library.metadata.engine, "before_cursor_execute", record)

        assert request.kernel is not None and request.kernel.init_seed == 2
        assert statements == ["SELECT", "SELECT"]  # the blueprint, then the kernel by index
        statements.clear()
        event.listen(library.metadata.engine, "before_cursor_execute", record)
        miss = find_or_enqueue(library, SPEC, target, init_seed=9)
        event.remove(library.metadata.engine, "before_cursor_execute", record)
        assert miss.job is not None and "INSERT" in statements  # a miss queues a compile
    finally:
        library.close()


def test_insert_ignoring_duplicates_counts_the_rows_it_inserted(metadata_url: str) -> None:
    """1 for a new row, 0 for a duplicate, on both backends (PostgreSQL's rowcount said -1)."""
    from sqlalchemy import Column, String, Table

    from esper.urza.sql_schema import insert_ignoring_duplicates

    probe = MetaData()
    table = Table("urza_test_insert_probe", probe, Column("key", String(8), primary_key=True))
    engine = _engine(metadata_url)
    probe.drop_all(engine)
    probe.create_all(engine)
    try:
        with engine.begin() as conn:
            assert insert_ignoring_duplicates(conn, table, {"key": "a"}) == 1
            assert insert_ignoring_duplicates(conn, table, {"key": "a"}) == 0
            assert insert_ignoring_duplicates(conn, table, {"key": "b"}) == 1
    finally:
        probe.drop_all(engine)
        engine.dispose()
