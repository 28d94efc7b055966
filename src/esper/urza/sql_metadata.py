"""SQL metadata store: blueprint and kernel rows in SQLite or PostgreSQL (SQLAlchemy 2 Core).

A :class:`SqlMetadataStore` opens the database named by its URL, creates or upgrades the schema
(:mod:`esper.urza.sql_schema`, :mod:`esper.urza.sql_migrations`) and carries the compile-job
queue on the same engine (:class:`~esper.urza.sql_jobs.SqlJobQueue`, as ``store.jobs``) and the
kernel aliases (:class:`~esper.urza.sql_aliases.SqlAliasStore`, as ``store.aliases``). It stores
rows only: checking ids, digests and write order is the library's work
(:mod:`esper.urza.storage_library`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import Row, func, select, update

from esper.contracts import (
    BlueprintRecord,
    BlueprintSpec,
    BlueprintStatus,
    KernelMetadata,
    KernelTarget,
)
from esper.urza.sql_aliases import SqlAliasStore
from esper.urza.sql_jobs import SqlJobQueue
from esper.urza.sql_migrations import create_or_upgrade_schema
from esper.urza.sql_schema import (
    blueprints_table,
    create_engine_for,
    database_url,
    insert_ignoring_duplicates,
    jobs_table,
    kernels_table,
)


def _blueprint_from_row(row: Row[Any]) -> BlueprintRecord:
    return BlueprintRecord(
        blueprint_id=row.blueprint_id,
        spec=BlueprintSpec.model_validate_json(row.spec_json),
        name=row.name,
        status=BlueprintStatus(row.status),
        reason=row.reason,
        created_at=row.created_at,
    )


class SqlMetadataStore:
    """Rows describing blueprints and kernels (and, through ``jobs``, compile jobs).

    Args:
        url: ``sqlite:///path/to/urza.sqlite3`` or ``postgresql://user@host:port/database``
            (``postgresql://`` uses the psycopg 3 driver).
    """

    def __init__(self, url: str) -> None:
        self._url = database_url(url)
        self.engine = create_engine_for(self._url)
        create_or_upgrade_schema(self.engine)
        self.jobs = SqlJobQueue(self.engine)
        self.aliases = SqlAliasStore(self.engine)

    @property
    def url(self) -> str:
        """The database URL with any password hidden."""
        return self._url.render_as_string(hide_password=True)

    @property
    def locations(self) -> tuple[str, ...]:
        """Every form of where the database is (URLs, file path, host:port), to keep out of
        answers sent to clients."""
        url = self._url
        found = [self.url, url.render_as_string(hide_password=False)]
        if url.get_backend_name() == "sqlite" and url.database:
            found += [url.database, str(Path(url.database).expanduser().resolve())]
        elif url.host:
            found.append(f"{url.host}:{url.port}" if url.port else url.host)
        return tuple(found)

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    def insert_blueprint(
        self, *, spec: BlueprintSpec, name: str | None, now: float
    ) -> BlueprintRecord:
        """Insert a blueprint unless present; fill a missing name; return the stored record.

        A blueprint already stored (with a name, or none asked for) is answered by one read:
        resubmitting a known blueprint, as every kernel lookup does, writes nothing.
        """
        blueprint_id = spec.blueprint_id
        with self.engine.connect() as conn:
            row = conn.execute(
                select(blueprints_table).where(blueprints_table.c.blueprint_id == blueprint_id)
            ).first()
        if row is not None and (name is None or row.name is not None):
            return _blueprint_from_row(row)
        with self.engine.begin() as conn:
            insert_ignoring_duplicates(
                conn,
                blueprints_table,
                {
                    "blueprint_id": blueprint_id,
                    "spec_json": spec.canonical_json(),
                    "name": name,
                    "status": BlueprintStatus.SUBMITTED.value,
                    "reason": None,
                    "created_at": now,
                },
            )
            if name is not None:
                conn.execute(
                    update(blueprints_table)
                    .where(blueprints_table.c.blueprint_id == blueprint_id)
                    .where(blueprints_table.c.name.is_(None))
                    .values(name=name)
                )
            row = conn.execute(
                select(blueprints_table).where(blueprints_table.c.blueprint_id == blueprint_id)
            ).one()
        return _blueprint_from_row(row)

    def get_blueprint(self, *, blueprint_id: str) -> BlueprintRecord | None:
        """The stored blueprint, or ``None``."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(blueprints_table).where(blueprints_table.c.blueprint_id == blueprint_id)
            ).first()
        return None if row is None else _blueprint_from_row(row)

    def list_blueprints(
        self, *, status: BlueprintStatus | None, limit: int | None = None, offset: int = 0
    ) -> list[BlueprintRecord]:
        """Blueprints, oldest first, optionally with one status (``limit`` rows after ``offset``)."""
        query = (
            select(blueprints_table)
            .order_by(blueprints_table.c.created_at, blueprints_table.c.blueprint_id)
            .limit(limit)
            .offset(offset)
        )
        if status is not None:
            query = query.where(blueprints_table.c.status == status.value)
        with self.engine.connect() as conn:
            return [_blueprint_from_row(row) for row in conn.execute(query)]

    def update_blueprint_status(
        self, *, blueprint_id: str, status: BlueprintStatus, reason: str | None
    ) -> BlueprintRecord | None:
        """Set a blueprint's status and reason; ``None`` when there is no such blueprint."""
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(blueprints_table)
                .where(blueprints_table.c.blueprint_id == blueprint_id)
                .values(status=status.value, reason=reason)
            ).rowcount
            if changed == 0:
                return None
            row = conn.execute(
                select(blueprints_table).where(blueprints_table.c.blueprint_id == blueprint_id)
            ).one()
        return _blueprint_from_row(row)

    # Kernels ------------------------------------------------------------------------------

    def insert_kernel(self, *, metadata: KernelMetadata, now: float) -> KernelMetadata:
        """Insert a kernel row (and its blueprint if new) unless present; return the stored one."""
        spec = metadata.blueprint
        target = metadata.target
        with self.engine.begin() as conn:
            insert_ignoring_duplicates(
                conn,
                blueprints_table,
                {
                    "blueprint_id": spec.blueprint_id,
                    "spec_json": spec.canonical_json(),
                    "name": None,
                    "status": BlueprintStatus.SUBMITTED.value,
                    "reason": None,
                    "created_at": now,
                },
            )
            insert_ignoring_duplicates(
                conn,
                kernels_table,
                {
                    "kernel_id": metadata.kernel_id,
                    "blueprint_id": spec.blueprint_id,
                    "in_features": target.in_features,
                    "out_features": target.out_features,
                    "channel_dim": target.channel_dim,
                    "spatial_dims": target.spatial_dims,
                    "device": target.device,
                    "dtype": metadata.dtype,
                    "size_bytes": metadata.size_bytes,
                    "metadata_json": metadata.model_dump_json(),
                    "created_at": now,
                    "init_seed": metadata.init_seed,
                },
            )
            stored = conn.execute(
                select(kernels_table.c.metadata_json).where(
                    kernels_table.c.kernel_id == metadata.kernel_id
                )
            ).scalar_one()
        return KernelMetadata.model_validate_json(stored)

    def get_kernel(self, *, kernel_id: str) -> KernelMetadata | None:
        """The stored kernel metadata, or ``None``."""
        with self.engine.connect() as conn:
            stored = conn.execute(
                select(kernels_table.c.metadata_json).where(kernels_table.c.kernel_id == kernel_id)
            ).scalar_one_or_none()
        return None if stored is None else KernelMetadata.model_validate_json(stored)

    def find_kernels(
        self,
        *,
        blueprint_id: str | None,
        target: KernelTarget | None,
        device: str | None,
        dtype: str | None,
        init_seed: int | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[KernelMetadata]:
        """Kernels matching every given filter, oldest first (``limit`` rows after ``offset``).

        With every filter given, the query walks :data:`~esper.urza.sql_schema.kernel_lookup_index`
        (O(log n) in the kernels stored)."""
        columns = kernels_table.c
        query = (
            select(columns.metadata_json)
            .order_by(columns.created_at, columns.kernel_id)
            .limit(limit)
            .offset(offset)
        )
        if blueprint_id is not None:
            query = query.where(columns.blueprint_id == blueprint_id)
        if target is not None:
            query = query.where(
                columns.in_features == target.in_features,
                columns.out_features == target.out_features,
                columns.channel_dim == target.channel_dim,
                columns.spatial_dims == target.spatial_dims,
            )
        if device is not None:
            query = query.where(columns.device == device)
        if dtype is not None:
            query = query.where(columns.dtype == dtype)
        if init_seed is not None:
            query = query.where(columns.init_seed == init_seed)
        with self.engine.connect() as conn:
            return [KernelMetadata.model_validate_json(stored) for stored in conn.scalars(query)]

    # Statistics ---------------------------------------------------------------------------

    def counts(self) -> tuple[dict[str, int], int, int, dict[str, int]]:
        """(blueprints by status, kernel count, kernel bytes, jobs by status)."""
        with self.engine.connect() as conn:
            blueprints = self._count_by_status(
                conn.execute(
                    select(blueprints_table.c.status, func.count()).group_by(
                        blueprints_table.c.status
                    )
                )
            )
            kernel_row = conn.execute(
                select(func.count(), func.coalesce(func.sum(kernels_table.c.size_bytes), 0))
            ).one()
            jobs = self._count_by_status(
                conn.execute(
                    select(jobs_table.c.status, func.count()).group_by(jobs_table.c.status)
                )
            )
        return blueprints, int(kernel_row[0]), int(kernel_row[1]), jobs

    @staticmethod
    def _count_by_status(rows: Iterable[Any]) -> dict[str, int]:
        return {str(row[0]): int(row[1]) for row in rows}
