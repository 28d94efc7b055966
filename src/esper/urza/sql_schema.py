"""SQL schema of the library: its tables and indexes, the accepted database URLs, engine setup.

Blueprint, kernel and compile-job rows live in tables prefixed ``urza_``; ``urza_schema_version``
records which version of this schema a database holds. They are created, or an older library
upgraded in place, when a store is opened (:mod:`esper.urza.sql_migrations`). SQLite runs in WAL mode with a 30 s busy timeout so several processes and threads can share one
file. SQLAlchemy and the database drivers are imported with this module, never by
``import esper.urza``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError

from esper.errors import ConfigurationError

ACCEPTED_SCHEMES = ("sqlite:///<path>", "postgresql://<user>@<host>:<port>/<database>")

schema = MetaData()

blueprints_table = Table(
    "urza_blueprints",
    schema,
    Column("blueprint_id", String(64), primary_key=True),
    Column("spec_json", Text, nullable=False),
    Column("name", String(200)),
    Column("status", String(16), nullable=False, index=True),
    Column("reason", Text),
    Column("created_at", Float, nullable=False),
)

kernels_table = Table(
    "urza_kernels",
    schema,
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
    # schema version 2: the seed the kernel was initialised from (also in metadata_json), so a
    # lookup finds its kernel by index instead of reading every seed's row
    Column("init_seed", BigInteger, nullable=False, server_default=text("0")),
)

kernel_lookup_index = Index(
    "ix_urza_kernels_lookup",
    kernels_table.c.blueprint_id,
    kernels_table.c.in_features,
    kernels_table.c.out_features,
    kernels_table.c.channel_dim,
    kernels_table.c.spatial_dims,
    kernels_table.c.device,
    kernels_table.c.dtype,
    kernels_table.c.init_seed,
    kernels_table.c.created_at,
    kernels_table.c.kernel_id,
)
"""The index a kernel lookup (blueprint, geometry, device, dtype, seed; oldest first) walks:
O(log n) in the kernels stored, where filtering the rows of a blueprint one by one was O(n)."""

schema_version_table = Table(
    "urza_schema_version",
    schema,
    Column("version", Integer, primary_key=True),
    Column("applied_at", Float, nullable=False),
)
"""One row per schema version applied to the database; the highest is its version."""

jobs_table = Table(
    "urza_compile_jobs",
    schema,
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


def database_url(url: str) -> URL:
    """Parse a metadata URL; ``postgresql://`` selects the psycopg 3 driver.

    Raises:
        ConfigurationError: for a URL that is neither SQLite nor PostgreSQL.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as error:
        raise ConfigurationError(
            f"metadata URL {url!r} is not a URL ({error}); accepted: {', '.join(ACCEPTED_SCHEMES)}."
        ) from None
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        if not parsed.database or parsed.database == ":memory:":
            raise ConfigurationError(
                f"metadata URL {url!r} names no SQLite file; the library is shared between "
                "threads and processes, so give a file: sqlite:///runs/urza/urza.sqlite3."
            )
        return parsed
    raise ConfigurationError(
        f"metadata URL {url!r} has an unsupported scheme {parsed.drivername!r}; accepted: "
        f"{', '.join(ACCEPTED_SCHEMES)}."
    )


def create_engine_for(url: URL) -> Engine:
    """An engine for a parsed metadata URL (SQLite: WAL mode, 30 s busy timeout)."""
    if url.get_backend_name() == "postgresql":
        return create_engine(url, pool_pre_ping=True)
    Path(url.database or "").expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30.0, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


def insert_ignoring_duplicates(conn: Connection, table: Table, values: dict[str, Any]) -> int:
    """``INSERT … ON CONFLICT DO NOTHING``; returns the number of rows inserted (0 or 1).

    Counted from ``RETURNING`` rows, not ``rowcount``: PostgreSQL's driver reports -1 for this
    statement whether or not the row went in.
    """
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = (
        dialect_insert(table)
        .values(**values)
        .on_conflict_do_nothing()
        .returning(*table.primary_key.columns)
    )
    return len(conn.execute(statement).fetchall())
