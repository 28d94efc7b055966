"""SQL schema migrations: create a new library's schema, or upgrade an older one in place.

A database records the schema versions applied to it in ``urza_schema_version``. Opening a store
brings the database to :data:`SCHEMA_VERSION`:

- a new database gets every table and index at once (``create_all``), recorded as the current
  version;
- a library created before versions were recorded (tables but no version table) is version 1;
- each missing version's migration then runs, in order, in one transaction with its version row,
  so an upgrade either completes or leaves the library as it was.

Concurrent openers are serialized while they change the schema: PostgreSQL by a
transaction-scoped advisory lock, SQLite by ``BEGIN IMMEDIATE`` (one writer). An opener that finds
the database current reads one row and takes no lock. A database from a newer Esper is refused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from sqlalchemy import Connection, Engine, bindparam, func, inspect, select, text, update

from esper.errors import ConfigurationError
from esper.urza.sql_schema import (
    kernel_lookup_index,
    kernels_table,
    schema,
    schema_version_table,
)

SCHEMA_VERSION = 2
"""The schema version this code reads and writes."""

_SCHEMA_LOCK_KEY = 7405217
"""PostgreSQL advisory-lock key held while the schema is created or upgraded."""

_BACKFILL_BATCH = 5000
"""Kernel rows read and updated per batch while a migration fills a new column."""


def _add_kernel_lookup(conn: Connection) -> None:
    """Version 2: the ``init_seed`` column of kernels (filled from each row's metadata) and the
    composite lookup index (blueprint, geometry, device, dtype, seed, age)."""
    conn.execute(text("ALTER TABLE urza_kernels ADD COLUMN init_seed BIGINT NOT NULL DEFAULT 0"))
    columns = kernels_table.c
    set_seed = (
        update(kernels_table)
        .where(columns.kernel_id == bindparam("row_id"))
        .values(init_seed=bindparam("row_seed"))
    )
    last_id = ""
    while True:
        rows = conn.execute(
            select(columns.kernel_id, columns.metadata_json)
            .where(columns.kernel_id > last_id)
            .order_by(columns.kernel_id)
            .limit(_BACKFILL_BATCH)
        ).all()
        if not rows:
            break
        seeds = [
            {"row_id": kernel_id, "row_seed": int(json.loads(stored).get("init_seed", 0))}
            for kernel_id, stored in rows
        ]
        changed = [row for row in seeds if row["row_seed"] != 0]
        if changed:
            conn.execute(set_seed, changed)
        last_id = rows[-1][0]
    kernel_lookup_index.create(conn)


MIGRATIONS: dict[int, Callable[[Connection], None]] = {2: _add_kernel_lookup}
"""Version -> the migration that brings a database from the version before it to this one."""


def schema_version(conn: Connection) -> int | None:
    """The database's schema version: ``None`` for an empty database, 1 for a library made
    before versions were recorded."""
    tables = inspect(conn)
    if tables.has_table(schema_version_table.name):
        version = conn.execute(select(func.max(schema_version_table.c.version))).scalar()
        if version is not None:
            return int(version)
    return 1 if tables.has_table(kernels_table.name) else None


def create_or_upgrade_schema(engine: Engine) -> int:
    """Bring the database behind ``engine`` to :data:`SCHEMA_VERSION`; returns the version it
    had (0: an empty database).

    Raises:
        ConfigurationError: the database was written by a newer Esper (its schema version is
            higher than :data:`SCHEMA_VERSION`).
    """
    with engine.connect() as conn:
        found = schema_version(conn)
    if found == SCHEMA_VERSION:
        return found
    _refuse_newer(found, engine)
    with engine.begin() as conn:
        _lock_schema(conn)
        found = schema_version(conn)  # another opener may have upgraded it meanwhile
        _refuse_newer(found, engine)
        if found is None:
            schema.create_all(conn)
            _record(conn, SCHEMA_VERSION)
            return 0
        schema.create_all(conn)  # tables added since (the version table itself, for version 1)
        for version in range(found + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[version](conn)
            _record(conn, version)
        return found


def _refuse_newer(found: int | None, engine: Engine) -> None:
    if found is not None and found > SCHEMA_VERSION:
        raise ConfigurationError(
            f"the library at {engine.url.render_as_string(hide_password=True)} has schema "
            f"version {found}, newer than this Esper reads ({SCHEMA_VERSION}); upgrade Esper "
            "to open it."
        )


def _lock_schema(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(text(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK_KEY})"))
    else:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _record(conn: Connection, version: int) -> None:
    conn.execute(schema_version_table.insert().values(version=version, applied_at=time.time()))
