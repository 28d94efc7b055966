"""The storage-backed library: :class:`ArtifactLibrary` over a SQL metadata store and a blob store.

This is the library that holds the data, whether embedded in a training process (SQLite and a
local folder) or behind the shared service (PostgreSQL and an S3-compatible bucket). It checks
what comes in (ids, digests, sizes), keeps the write order that makes a crash harmless (the
object is written before its metadata row, so a row never points at missing bytes), and checks
the digest of every artifact it reads.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import BinaryIO

from esper.contracts import (
    BlueprintRecord,
    BlueprintSpec,
    BlueprintStatus,
    CompileJob,
    CompileJobStatus,
    KernelAlias,
    KernelMetadata,
    KernelTarget,
    LibraryStats,
)
from esper.contracts.bounds import MAX_INT64, MAX_NAME_CHARS, text_within_bounds
from esper.errors import ArtifactIntegrityError, ConfigurationError, KernelNotFoundError
from esper.urza.artifact_check import check_metadata, scan_artifact
from esper.urza.blob_stores import DEFAULT_CHUNK_BYTES, BlobStore
from esper.urza.content_ids import (
    check_content_id,
    check_job_id,
    new_job_id,
    verified_chunks,
    verify_digest,
)
from esper.urza.errors import BlueprintNotFoundError
from esper.urza.kernel_names import check_alias_name, resolve_kernel_name
from esper.urza.library import DEFAULT_LEASE_SECONDS, MAX_LEASE_SECONDS
from esper.urza.pagination import check_page
from esper.urza.sql_metadata import SqlMetadataStore

logger = logging.getLogger(__name__)


def _check_name(value: str | None, *, what: str) -> str:
    if isinstance(value, str) and 0 < len(value) <= MAX_NAME_CHARS and "\x00" not in value:
        return value
    raise ConfigurationError(
        f"{what} must be a string of 1-{MAX_NAME_CHARS} characters without NUL, got {value!r:.80}."
    )


def _check_worker_id(worker_id: str) -> str:
    return _check_name(worker_id, what="worker id")


def _check_lease(lease_seconds: float) -> float:
    if (
        isinstance(lease_seconds, int | float)
        and math.isfinite(lease_seconds)
        and 0 < lease_seconds <= MAX_LEASE_SECONDS
    ):
        return float(lease_seconds)
    raise ConfigurationError(
        f"lease_seconds must be a number of seconds in (0, {MAX_LEASE_SECONDS}], got "
        f"{lease_seconds!r:.40}."
    )


def _check_init_seed(init_seed: int) -> int:
    if type(init_seed) is int and 0 <= init_seed <= MAX_INT64:
        return init_seed
    raise ConfigurationError(
        f"init_seed must be an integer from 0 to 2**63-1, got {init_seed!r:.40}."
    )


class StorageLibrary:
    """An :class:`~esper.urza.library.ArtifactLibrary` that owns its metadata and blob stores.

    Args:
        metadata: the SQL store of blueprint, kernel and job rows.
        blobs: the store of artifact bytes.
        clock: seconds since the epoch; timestamps and job leases use it.
    """

    def __init__(
        self,
        *,
        metadata: SqlMetadataStore,
        blobs: BlobStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.metadata = metadata
        self.blobs = blobs
        self._clock = clock

    def __repr__(self) -> str:
        return f"StorageLibrary(metadata={self.metadata.url!r}, blobs={self.blobs.url!r})"

    def __enter__(self) -> StorageLibrary:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # Blueprints ---------------------------------------------------------------------------

    def submit_blueprint(self, spec: BlueprintSpec, *, name: str | None = None) -> BlueprintRecord:
        """Store ``spec`` under its content id (idempotent)."""
        if name is not None:
            _check_name(name, what="blueprint name")
        return self.metadata.insert_blueprint(spec=spec, name=name, now=self._clock())

    def get_blueprint(self, blueprint_id: str) -> BlueprintRecord:
        """The record of one blueprint."""
        check_content_id(blueprint_id, what="blueprint id")
        record = self.metadata.get_blueprint(blueprint_id=blueprint_id)
        if record is None:
            raise self._blueprint_not_found(blueprint_id)
        return record

    def list_blueprints(
        self, status: BlueprintStatus | None = None, *, limit: int | None = None, offset: int = 0
    ) -> list[BlueprintRecord]:
        """Blueprints, oldest first (``limit`` of them after ``offset``; ``None``: all)."""
        limit, offset = check_page(limit, offset)
        return self.metadata.list_blueprints(
            status=None if status is None else BlueprintStatus(status), limit=limit, offset=offset
        )

    def set_blueprint_status(
        self, blueprint_id: str, status: BlueprintStatus, reason: str | None = None
    ) -> BlueprintRecord:
        """Change a blueprint's status."""
        check_content_id(blueprint_id, what="blueprint id")
        record = self.metadata.update_blueprint_status(
            blueprint_id=blueprint_id,
            status=BlueprintStatus(status),
            reason=None if reason is None else text_within_bounds(str(reason)),
        )
        if record is None:
            raise self._blueprint_not_found(blueprint_id)
        return record

    @staticmethod
    def _blueprint_not_found(blueprint_id: str) -> BlueprintNotFoundError:
        return BlueprintNotFoundError(
            f"no blueprint {blueprint_id} in the library; submit_blueprint(spec) first "
            "(the id is spec.blueprint_id)."
        )

    # Kernels ------------------------------------------------------------------------------

    def put_kernel(self, artifact: bytes, metadata: KernelMetadata) -> KernelMetadata:
        """Check and store an artifact: bytes first, then the metadata row."""
        return self.put_kernel_file(io.BytesIO(artifact), metadata)

    def put_kernel_file(self, file: BinaryIO, metadata: KernelMetadata) -> KernelMetadata:
        """:meth:`put_kernel` for an artifact in a seekable binary file (read from its start).

        The file is read twice (checked, then copied to the blob store), never held in memory
        whole: the service spools uploads to a temporary file and stores them from there.
        """
        kernel_id = metadata.kernel_id
        file.seek(0)
        scan = scan_artifact(file)
        if scan.size_bytes != metadata.size_bytes:
            raise ArtifactIntegrityError(
                f"kernel {kernel_id}: the artifact is {scan.size_bytes} bytes but its metadata "
                f"says size_bytes={metadata.size_bytes}; nothing was stored. Build the metadata "
                "from the artifact being put."
            )
        if scan.kernel_id != kernel_id:
            raise ArtifactIntegrityError(
                f"kernel {kernel_id}: the artifact being put has sha256 {scan.kernel_id}, "
                f"expected {kernel_id} (metadata.kernel_id must be "
                "hashlib.sha256(artifact).hexdigest()); nothing was stored."
            )
        check_metadata(scan.facts(), metadata)
        # Always (re)write the object: a put repairs a corrupted or missing copy.
        file.seek(0)
        self.blobs.put_file(kernel_id, file)
        return self.metadata.insert_kernel(metadata=metadata, now=self._clock())

    def get_kernel_bytes(self, kernel_id: str) -> bytes:
        """The artifact's bytes, checked against the id.

        Bytes are read by content address straight from the blob store: the digest check is
        what makes them trustworthy, so no metadata query sits on the fetch path.
        """
        check_content_id(kernel_id)
        return verify_digest(
            self.blobs.get(kernel_id), kernel_id, where=f"read from {self.blobs.url}"
        )

    def iter_kernel_chunks(
        self, kernel_id: str, *, chunk_size: int = DEFAULT_CHUNK_BYTES
    ) -> Iterator[bytes]:
        """Stream the artifact; opened now, digest checked after the last chunk."""
        check_content_id(kernel_id)
        chunks = self.blobs.iter_chunks(kernel_id, chunk_size=chunk_size)
        return verified_chunks(chunks, kernel_id, where=f"streamed from {self.blobs.url}")

    def get_kernel_metadata(self, kernel_id: str) -> KernelMetadata:
        """The metadata stored with a kernel."""
        check_content_id(kernel_id)
        metadata = self.metadata.get_kernel(kernel_id=kernel_id)
        if metadata is None:
            raise KernelNotFoundError(
                f"kernel {kernel_id}: no such kernel in the library at {self.metadata.url}. "
                "Check the id, or find_kernels(...) to see what is stored."
            )
        return metadata

    def find_kernels(
        self,
        *,
        blueprint_id: str | None = None,
        target: KernelTarget | None = None,
        device: str | None = None,
        dtype: str | None = None,
        init_seed: int | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[KernelMetadata]:
        """Kernels matching every given filter, oldest first (a page; ``None``: all)."""
        if blueprint_id is not None:
            check_content_id(blueprint_id, what="blueprint id")
        limit, offset = check_page(limit, offset)
        return self.metadata.find_kernels(
            blueprint_id=blueprint_id,
            target=target,
            device=device,
            dtype=dtype,
            init_seed=None if init_seed is None else _check_init_seed(init_seed),
            limit=limit,
            offset=offset,
        )

    # Kernel names -------------------------------------------------------------------------

    def tag_kernel(self, name: str, kernel_id: str, *, move: bool = False) -> KernelAlias:
        """Make the alias ``name`` name a stored kernel (``move=True`` to re-point it)."""
        check_alias_name(name)
        check_content_id(kernel_id)
        if not isinstance(move, bool):
            raise ConfigurationError(f"move must be True or False, got {move!r:.40}")
        previous = self.metadata.aliases.get(name=name)
        alias = self.metadata.aliases.tag(
            name=name, kernel_id=kernel_id, move=move, now=self._clock()
        )
        if previous is not None and previous.kernel_id != kernel_id:
            logger.info("alias %r moved from kernel %s to %s", name, previous.kernel_id, kernel_id)
        return alias

    def list_aliases(
        self, *, kernel_id: str | None = None, limit: int | None = None, offset: int = 0
    ) -> list[KernelAlias]:
        """Aliases by name, optionally only those of ``kernel_id`` (a page; ``None``: all)."""
        if kernel_id is not None:
            check_content_id(kernel_id)
        limit, offset = check_page(limit, offset)
        return self.metadata.aliases.find(kernel_id=kernel_id, limit=limit, offset=offset)

    def resolve_kernel(self, name: str) -> str:
        """The kernel id that ``name`` (an id, a unique id prefix or an alias) stands for."""
        aliases = self.metadata.aliases
        return resolve_kernel_name(
            name,
            alias=lambda alias: aliases.get(name=alias),
            ids_with_prefix=lambda prefix: aliases.ids_with_prefix(prefix=prefix, limit=2),
            where=f"the library at {self.metadata.url}",
        )

    # Compile jobs -------------------------------------------------------------------------

    def enqueue_job(
        self, blueprint_id: str, target: KernelTarget, *, init_seed: int = 0
    ) -> CompileJob:
        """Queue a compile of a submitted blueprint (or return the equal pending job)."""
        self.get_blueprint(blueprint_id)
        return self.metadata.jobs.enqueue(
            job_id=new_job_id(),
            blueprint_id=blueprint_id,
            target=target,
            init_seed=_check_init_seed(init_seed),
            now=self._clock(),
        )

    def claim_job(
        self, worker_id: str, *, lease_seconds: float = DEFAULT_LEASE_SECONDS
    ) -> CompileJob | None:
        """Atomically claim the oldest claimable job, or return ``None``."""
        return self.metadata.jobs.claim(
            worker_id=_check_worker_id(worker_id),
            lease_seconds=_check_lease(lease_seconds),
            now=self._clock(),
        )

    def renew_lease(
        self, job_id: str, worker_id: str, *, lease_seconds: float = DEFAULT_LEASE_SECONDS
    ) -> CompileJob:
        """Extend the lease of a job that ``worker_id`` holds."""
        return self.metadata.jobs.renew_lease(
            job_id=check_job_id(job_id),
            worker_id=_check_worker_id(worker_id),
            lease_seconds=_check_lease(lease_seconds),
            now=self._clock(),
        )

    def complete_job(self, job_id: str, worker_id: str, kernel_id: str) -> CompileJob:
        """Mark a claimed job SUCCEEDED with the kernel it produced."""
        return self.metadata.jobs.finish(
            job_id=check_job_id(job_id),
            worker_id=_check_worker_id(worker_id),
            status=CompileJobStatus.SUCCEEDED,
            kernel_id=check_content_id(kernel_id),
            error=None,
        )

    def fail_job(self, job_id: str, worker_id: str, error: str) -> CompileJob:
        """Mark a claimed job FAILED with the reason."""
        return self.metadata.jobs.finish(
            job_id=check_job_id(job_id),
            worker_id=_check_worker_id(worker_id),
            status=CompileJobStatus.FAILED,
            kernel_id=None,
            error=text_within_bounds(str(error)),
        )

    def get_job(self, job_id: str) -> CompileJob:
        """One compile job."""
        return self.metadata.jobs.get(job_id=check_job_id(job_id))

    def list_jobs(
        self,
        status: CompileJobStatus | None = None,
        *,
        blueprint_id: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[CompileJob]:
        """Compile jobs, oldest first (a page; ``None``: all)."""
        if blueprint_id is not None:
            check_content_id(blueprint_id, what="blueprint id")
        limit, offset = check_page(limit, offset)
        return self.metadata.jobs.find(
            status=None if status is None else CompileJobStatus(status),
            blueprint_id=blueprint_id,
            limit=limit,
            offset=offset,
        )

    # Library ------------------------------------------------------------------------------

    def stats(self) -> LibraryStats:
        """Counts of what the library holds (every status present, zero when empty)."""
        blueprints, kernels, kernel_bytes, jobs = self.metadata.counts()
        return LibraryStats(
            blueprints_by_status={s: blueprints.get(s.value, 0) for s in BlueprintStatus},
            kernels=kernels,
            kernel_bytes=kernel_bytes,
            jobs_by_status={s: jobs.get(s.value, 0) for s in CompileJobStatus},
        )

    def locations(self) -> tuple[str, ...]:
        """Every form of where this library keeps its data (database URL and file, blob folder
        or bucket): the service keeps these out of the answers it sends."""
        return (*self.metadata.locations, *self.blobs.locations)

    def close(self) -> None:
        """Close the metadata and blob stores."""
        self.metadata.close()
        self.blobs.close()
