"""SQL kernel aliases: the ``urza_kernel_aliases`` table (name -> kernel id) and its queries.

The table joins the library's schema (:data:`esper.urza.sql_schema.schema`) when this module is
imported, so ``create_all`` adds it to libraries created before aliases existed. A name names one
kernel; setting a name that already names another kernel is refused unless the caller asks to
move it, and the move is a conditional ``UPDATE`` (it only changes the row it read), so two
concurrent movers never lose an update silently. Names and ids are checked by the library
(:mod:`esper.urza.storage_library`) before they reach this module.
"""

from __future__ import annotations

from sqlalchemy import Column, Engine, Float, String, Table, delete, select, update
from sqlalchemy.engine import Connection

from esper.contracts import KernelAlias
from esper.contracts.kernel_aliases import MAX_ALIAS_CHARS
from esper.errors import KernelNotFoundError
from esper.urza.errors import AliasConflictError
from esper.urza.sql_schema import insert_ignoring_duplicates, kernels_table, schema

aliases_table = Table(
    "urza_kernel_aliases",
    schema,
    Column("name", String(MAX_ALIAS_CHARS), primary_key=True),
    Column("kernel_id", String(64), nullable=False, index=True),
    Column("updated_at", Float, nullable=False),
)


class SqlAliasStore:
    """Alias rows on the library's engine (shared with the metadata store).

    Args:
        engine: the library's SQLAlchemy engine; the schema is already created.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def tag(self, *, name: str, kernel_id: str, move: bool, now: float) -> KernelAlias:
        """Make ``name`` name ``kernel_id``; returns the stored alias.

        Setting the alias it already is changes nothing (the first ``updated_at`` stays).

        Raises:
            KernelNotFoundError: no kernel ``kernel_id`` is stored.
            AliasConflictError: ``name`` names another kernel and ``move`` is false.
        """
        with self.engine.begin() as conn:
            known = conn.execute(
                select(kernels_table.c.kernel_id).where(kernels_table.c.kernel_id == kernel_id)
            ).scalar_one_or_none()
            if known is None:
                raise KernelNotFoundError(
                    f"cannot tag kernel {kernel_id} as {name!r}: no such kernel in the library"
                )
            values = {"name": name, "kernel_id": kernel_id, "updated_at": now}
            if insert_ignoring_duplicates(conn, aliases_table, values) == 1:
                return KernelAlias(**values)
            current = self._row(conn, name)
            if current is not None and current.kernel_id == kernel_id:
                return current
            if current is None:
                raise AliasConflictError(
                    f"alias {name!r} was removed by someone else while it was being set; retry"
                )
            if not move:
                raise AliasConflictError(
                    f"alias {name!r} already names kernel {current.kernel_id}; move it "
                    f"explicitly (`esper kernel tag {name} {kernel_id[:12]} --move`, or "
                    "tag_kernel(..., move=True))"
                )
            moved = conn.execute(
                update(aliases_table)
                .where(
                    aliases_table.c.name == name,
                    aliases_table.c.kernel_id == current.kernel_id,
                )
                .values(kernel_id=kernel_id, updated_at=now)
            ).rowcount
            if moved != 1:
                raise AliasConflictError(
                    f"alias {name!r} was moved by someone else while it was being moved to "
                    f"{kernel_id}; look at it again (`esper kernel aliases`) and retry"
                )
            return KernelAlias(**values)

    def get(self, *, name: str) -> KernelAlias | None:
        """The alias ``name``, or ``None``."""
        with self.engine.connect() as conn:
            return self._row(conn, name)

    def remove(self, *, name: str) -> bool:
        """Delete the alias ``name``; whether it existed."""
        with self.engine.begin() as conn:
            result = conn.execute(delete(aliases_table).where(aliases_table.c.name == name))
        return bool(result.rowcount)

    def find(self, *, kernel_id: str | None, limit: int | None, offset: int) -> list[KernelAlias]:
        """Aliases by name (only those of ``kernel_id`` when given): ``limit`` after ``offset``."""
        query = select(aliases_table).order_by(aliases_table.c.name).limit(limit).offset(offset)
        if kernel_id is not None:
            query = query.where(aliases_table.c.kernel_id == kernel_id)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            KernelAlias(name=row.name, kernel_id=row.kernel_id, updated_at=row.updated_at)
            for row in rows
        ]

    def ids_with_prefix(self, *, prefix: str, limit: int) -> list[str]:
        """Up to ``limit`` stored kernel ids that start with ``prefix`` (lowercase hex)."""
        query = (
            select(kernels_table.c.kernel_id)
            .where(kernels_table.c.kernel_id.startswith(prefix, autoescape=True))
            .order_by(kernels_table.c.kernel_id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return list(conn.execute(query).scalars())

    @staticmethod
    def _row(conn: Connection, name: str) -> KernelAlias | None:
        row = conn.execute(select(aliases_table).where(aliases_table.c.name == name)).first()
        if row is None:
            return None
        return KernelAlias(name=row.name, kernel_id=row.kernel_id, updated_at=row.updated_at)
