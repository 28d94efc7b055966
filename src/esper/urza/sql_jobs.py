"""SQL compile-job queue: enqueue, atomic claims with leases, completion, in SQLite or PostgreSQL.

A worker claims the oldest claimable job (QUEUED, or CLAIMED with a lapsed lease because its
worker died) for a lease; each claim bumps ``attempts``. Claims are atomic on both databases:
PostgreSQL locks the oldest claimable row with ``SELECT … FOR UPDATE SKIP LOCKED``, so concurrent
claimers skip each other's rows; SQLite, which serializes writers, uses a conditional ``UPDATE``
that only matches the row in the state the claimer saw (same status, same attempt count) and
checks that it changed exactly one row. Lease times come from the clock of the process that
claims (the library's ``clock``), so hosts that share a queue should keep their clocks in sync.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Engine, Row, and_, or_, select, update

from esper.contracts import BlueprintStatus, CompileJob, CompileJobStatus, KernelTarget
from esper.errors import KernelNotFoundError
from esper.urza.errors import JobNotFoundError, JobStateError
from esper.urza.sql_schema import blueprints_table, jobs_table, kernels_table

_PENDING = (CompileJobStatus.QUEUED.value, CompileJobStatus.CLAIMED.value)
_SQLITE_CLAIM_CANDIDATES = 8
"""Rows a SQLite claimer tries per look before looking again."""


def _canonical_target(target: KernelTarget) -> str:
    return json.dumps(target.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def _job_from_row(row: Row[Any]) -> CompileJob:
    return CompileJob(
        job_id=row.job_id,
        blueprint_id=row.blueprint_id,
        target=KernelTarget.model_validate_json(row.target_json),
        init_seed=row.init_seed,
        status=CompileJobStatus(row.status),
        attempts=row.attempts,
        worker_id=row.worker_id,
        claimed_at=row.claimed_at,
        lease_expires_at=row.lease_expires_at,
        kernel_id=row.kernel_id,
        error=row.error,
        created_at=row.created_at,
    )


def _claimable(now: float) -> Any:
    return or_(
        jobs_table.c.status == CompileJobStatus.QUEUED.value,
        and_(
            jobs_table.c.status == CompileJobStatus.CLAIMED.value,
            jobs_table.c.lease_expires_at < now,
        ),
    )


class SqlJobQueue:
    """Compile-job rows and the claim protocol, on an engine shared with the metadata store.

    Args:
        engine: the metadata store's engine (its schema already created).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def enqueue(
        self, *, job_id: str, blueprint_id: str, target: KernelTarget, init_seed: int, now: float
    ) -> CompileJob:
        """Insert a QUEUED job unless an equal one is still pending; return the pending one."""
        target_json = _canonical_target(target)
        columns = jobs_table.c
        with self.engine.begin() as conn:
            pending = conn.execute(
                select(jobs_table)
                .where(
                    columns.blueprint_id == blueprint_id,
                    columns.target_json == target_json,
                    columns.init_seed == init_seed,
                    columns.status.in_(_PENDING),
                )
                .order_by(columns.created_at)
                .limit(1)
            ).first()
            if pending is not None:
                return _job_from_row(pending)
            values = {
                "job_id": job_id,
                "blueprint_id": blueprint_id,
                "target_json": target_json,
                "init_seed": init_seed,
                "status": CompileJobStatus.QUEUED.value,
                "attempts": 0,
                "created_at": now,
            }
            conn.execute(jobs_table.insert().values(**values))
            row = conn.execute(select(jobs_table).where(columns.job_id == job_id)).one()
        return _job_from_row(row)

    def claim(self, *, worker_id: str, lease_seconds: float, now: float) -> CompileJob | None:
        """Atomically hand the oldest claimable job to ``worker_id``; ``None`` if there is none."""
        if self.engine.dialect.name == "postgresql":
            return self._claim_skip_locked(
                worker_id=worker_id, lease_seconds=lease_seconds, now=now
            )
        return self._claim_conditional(worker_id=worker_id, lease_seconds=lease_seconds, now=now)

    def _claim_values(self, *, worker_id: str, lease_seconds: float, now: float) -> dict[str, Any]:
        return {
            "status": CompileJobStatus.CLAIMED.value,
            "worker_id": worker_id,
            "claimed_at": now,
            "lease_expires_at": now + lease_seconds,
            "attempts": jobs_table.c.attempts + 1,
            "error": None,
        }

    def _claim_skip_locked(
        self, *, worker_id: str, lease_seconds: float, now: float
    ) -> CompileJob | None:
        columns = jobs_table.c
        with self.engine.begin() as conn:
            job_id = conn.execute(
                select(columns.job_id)
                .where(_claimable(now))
                .order_by(columns.created_at, columns.job_id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).scalar_one_or_none()
            if job_id is None:
                return None
            conn.execute(
                update(jobs_table)
                .where(columns.job_id == job_id)
                .values(
                    **self._claim_values(worker_id=worker_id, lease_seconds=lease_seconds, now=now)
                )
            )
            row = conn.execute(select(jobs_table).where(columns.job_id == job_id)).one()
        return _job_from_row(row)

    def _claim_conditional(
        self, *, worker_id: str, lease_seconds: float, now: float
    ) -> CompileJob | None:
        columns = jobs_table.c
        while True:
            with self.engine.connect() as conn:
                candidates = conn.execute(
                    select(columns.job_id, columns.status, columns.attempts)
                    .where(_claimable(now))
                    .order_by(columns.created_at, columns.job_id)
                    .limit(_SQLITE_CLAIM_CANDIDATES)
                ).all()
            if not candidates:
                return None
            for candidate in candidates:
                with self.engine.begin() as conn:
                    # Matches only if nobody claimed the row since we read it: the status and
                    # the attempt count (bumped by every claim) are still what we saw.
                    claimed = conn.execute(
                        update(jobs_table)
                        .where(
                            columns.job_id == candidate.job_id,
                            columns.status == candidate.status,
                            columns.attempts == candidate.attempts,
                            _claimable(now),
                        )
                        .values(
                            **self._claim_values(
                                worker_id=worker_id, lease_seconds=lease_seconds, now=now
                            )
                        )
                    ).rowcount
                    if claimed == 1:
                        row = conn.execute(
                            select(jobs_table).where(columns.job_id == candidate.job_id)
                        ).one()
                        return _job_from_row(row)
            # Every candidate went to another claimer meanwhile: look again.

    def renew_lease(
        self, *, job_id: str, worker_id: str, lease_seconds: float, now: float
    ) -> CompileJob:
        """Push back the lease of a job that ``worker_id`` holds."""
        columns = jobs_table.c
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(jobs_table)
                .where(
                    columns.job_id == job_id,
                    columns.status == CompileJobStatus.CLAIMED.value,
                    columns.worker_id == worker_id,
                )
                .values(lease_expires_at=now + lease_seconds)
            ).rowcount
            row = conn.execute(select(jobs_table).where(columns.job_id == job_id)).first()
        job = self._existing_job(row, job_id)
        if changed != 1:
            raise self._not_held(job, worker_id, action="renew the lease of")
        return job

    def finish(
        self,
        *,
        job_id: str,
        worker_id: str,
        status: CompileJobStatus,
        kernel_id: str | None,
        error: str | None,
    ) -> CompileJob:
        """Move a job that ``worker_id`` holds to SUCCEEDED or FAILED.

        Repeating a call that already succeeded returns the job. On success, a SUBMITTED
        blueprint becomes VALID in the same transaction. Raises KernelNotFoundError when a
        success names a kernel without a row.
        """
        columns = jobs_table.c
        with self.engine.begin() as conn:
            row = conn.execute(select(jobs_table).where(columns.job_id == job_id)).first()
            job = self._existing_job(row, job_id)
            if (job.status, job.worker_id, job.kernel_id, job.error) == (
                status,
                worker_id,
                kernel_id,
                error,
            ):
                return job
            if kernel_id is not None and (
                conn.execute(
                    select(kernels_table.c.kernel_id).where(kernels_table.c.kernel_id == kernel_id)
                ).first()
                is None
            ):
                raise KernelNotFoundError(
                    f"compile job {job_id}: kernel {kernel_id} is not in the library; put the "
                    "artifact (put_kernel) before completing the job."
                )
            changed = conn.execute(
                update(jobs_table)
                .where(
                    columns.job_id == job_id,
                    columns.status == CompileJobStatus.CLAIMED.value,
                    columns.worker_id == worker_id,
                )
                .values(
                    status=status.value, kernel_id=kernel_id, error=error, lease_expires_at=None
                )
            ).rowcount
            if changed != 1:
                raise self._not_held(job, worker_id, action=f"mark {status.value}")
            if status is CompileJobStatus.SUCCEEDED:
                conn.execute(
                    update(blueprints_table)
                    .where(
                        blueprints_table.c.blueprint_id == job.blueprint_id,
                        blueprints_table.c.status == BlueprintStatus.SUBMITTED.value,
                    )
                    .values(status=BlueprintStatus.VALID.value)
                )
            row = conn.execute(select(jobs_table).where(columns.job_id == job_id)).one()
        return _job_from_row(row)

    @staticmethod
    def _existing_job(row: Row[Any] | None, job_id: str) -> CompileJob:
        if row is None:
            raise JobNotFoundError(f"no compile job {job_id} in the library; check the job id.")
        return _job_from_row(row)

    @staticmethod
    def _not_held(job: CompileJob, worker_id: str, *, action: str) -> JobStateError:
        if job.status is CompileJobStatus.CLAIMED:
            holder = f"is claimed by worker {job.worker_id!r}"
            hint = "its lease lapsed and it was reclaimed; drop this result"
        else:
            holder = f"is {job.status.value} (worker {job.worker_id!r})"
            hint = "only a job's current claimer can finish it"
        return JobStateError(
            f"worker {worker_id!r} cannot {action} compile job {job.job_id}: the job {holder}; "
            f"{hint}."
        )

    def get(self, *, job_id: str) -> CompileJob:
        """One job; raises JobNotFoundError."""
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs_table).where(jobs_table.c.job_id == job_id)).first()
        return self._existing_job(row, job_id)

    def find(
        self,
        *,
        status: CompileJobStatus | None,
        blueprint_id: str | None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[CompileJob]:
        """Jobs, oldest first, optionally filtered (``limit`` rows after ``offset``)."""
        columns = jobs_table.c
        query = (
            select(jobs_table)
            .order_by(columns.created_at, columns.job_id)
            .limit(limit)
            .offset(offset)
        )
        if status is not None:
            query = query.where(columns.status == status.value)
        if blueprint_id is not None:
            query = query.where(columns.blueprint_id == blueprint_id)
        with self.engine.connect() as conn:
            return [_job_from_row(row) for row in conn.execute(query)]

    # Statistics ---------------------------------------------------------------------------
