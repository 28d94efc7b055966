"""The artifact library interface: one Protocol for blueprints, kernels and compile jobs.

Every Urza backend implements :class:`ArtifactLibrary`: the embedded library over SQLite and a
local folder, the same library over PostgreSQL and an S3-compatible bucket, and
:class:`~esper.urza.http_client.HttpUrza`, which talks to the shared service. Callers hold an
``ArtifactLibrary`` and never need to know which side of the network the library is on; get one
from :func:`esper.urza.open_library`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

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

DEFAULT_LEASE_SECONDS = 600.0
"""How long a claimed compile job stays with its worker before another may reclaim it."""

MAX_LEASE_SECONDS = 7 * 24 * 3600.0
"""Longest lease a worker may ask for (a week)."""


@runtime_checkable
class ArtifactLibrary(Protocol):
    """Blueprints, kernel artifacts and compile jobs, behind one interface.

    Kernel artifacts are immutable and content-addressed: a kernel id is the sha256 of the
    artifact's bytes, and every read checks the digest (a mismatch raises
    :class:`esper.errors.ArtifactIntegrityError` naming the id and both digests). Unknown ids
    raise :class:`esper.errors.KernelNotFoundError`,
    :class:`~esper.urza.errors.BlueprintNotFoundError` or
    :class:`~esper.urza.errors.JobNotFoundError`; malformed ids raise
    :class:`esper.errors.ConfigurationError`.
    """

    # Blueprints ---------------------------------------------------------------------------

    def submit_blueprint(self, spec: BlueprintSpec, *, name: str | None = None) -> BlueprintRecord:
        """Store ``spec`` under its content id; submitting the same spec again returns the record.

        A name given on a later submission fills in a missing name but never renames.
        """
        ...

    def get_blueprint(self, blueprint_id: str) -> BlueprintRecord:
        """The record of one blueprint."""
        ...

    def list_blueprints(
        self, status: BlueprintStatus | None = None, *, limit: int | None = None, offset: int = 0
    ) -> list[BlueprintRecord]:
        """Blueprints, oldest first, optionally only those with ``status``.

        ``limit`` rows (1 to :data:`~esper.urza.pagination.MAX_PAGE_SIZE`; ``None``: all) after
        skipping ``offset``; the same for every list below.
        """
        ...

    def set_blueprint_status(
        self, blueprint_id: str, status: BlueprintStatus, reason: str | None = None
    ) -> BlueprintRecord:
        """Change a blueprint's status (``reason`` says why, e.g. the validation error)."""
        ...

    # Kernels ------------------------------------------------------------------------------

    def put_kernel(self, artifact: bytes, metadata: KernelMetadata) -> KernelMetadata:
        """Store an artifact and its metadata; idempotent; returns the stored metadata.

        The artifact must hash to ``metadata.kernel_id`` and be ``metadata.size_bytes`` long
        (else :class:`~esper.errors.ArtifactIntegrityError`), be a well-formed kernel artifact
        (else :class:`~esper.errors.ArtifactFormatError`), and ``metadata`` must say what the
        artifact's header says: blueprint, target, init seed, parameter count, dtype, checksum
        (else :class:`~esper.urza.errors.KernelMetadataMismatchError`); a refused put stores
        nothing (every refusal is in :data:`~esper.urza.errors.ARTIFACT_REFUSALS`). The bytes
        are written before the metadata row, so a listed kernel always has its bytes. The
        blueprint is registered if it was not submitted before. Putting an id that is already
        stored keeps the first metadata and returns it.
        """
        ...

    def get_kernel_bytes(self, kernel_id: str) -> bytes:
        """The artifact's bytes, checked against the id."""
        ...

    def iter_kernel_chunks(
        self, kernel_id: str, *, chunk_size: int = 256 * 1024
    ) -> Iterator[bytes]:
        """Stream the artifact: opened now (raising if unknown), checked after the last chunk.

        The digest is only known once the stream ends: keep the chunks aside until the iterator
        finishes without :class:`~esper.errors.ArtifactIntegrityError`.
        """
        ...

    def get_kernel_metadata(self, kernel_id: str) -> KernelMetadata:
        """The metadata stored with a kernel."""
        ...

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
        """Kernels matching every given filter, oldest first (a page of them: see
        :meth:`list_blueprints`).

        Args:
            blueprint_id: built from this blueprint.
            target: built for the same layer geometry (in/out features, channel dim, spatial
                dims; see :meth:`KernelTarget.same_geometry`), whatever its dtype and device.
            device: built for this device (``metadata.target.device``).
            dtype: with this dtype (``metadata.dtype``).
            init_seed: initialised from this seed (``metadata.init_seed``).
        """
        ...

    # Kernel names -------------------------------------------------------------------------

    def tag_kernel(self, name: str, kernel_id: str, *, move: bool = False) -> KernelAlias:
        """Make the alias ``name`` name the stored kernel ``kernel_id``; returns the alias.

        Tagging a kernel with the alias it already has changes nothing. An alias that names
        another kernel is moved only with ``move=True`` (logged), else
        :class:`~esper.urza.errors.AliasConflictError`. Names follow
        :func:`esper.contracts.kernel_aliases.alias_problem` (never all hex digits).
        """
        ...

    def list_aliases(
        self, *, kernel_id: str | None = None, limit: int | None = None, offset: int = 0
    ) -> list[KernelAlias]:
        """Aliases in name order, optionally only those naming ``kernel_id`` (a page)."""
        ...

    def resolve_kernel(self, name: str) -> str:
        """The kernel id ``name`` stands for: a kernel id (returned as is), a unique id prefix
        (6+ hex digits) or an alias (see :mod:`esper.urza.kernel_names`).

        Raises :class:`~esper.errors.KernelNotFoundError` naming ``name`` when nothing matches,
        :class:`~esper.errors.AmbiguousKernelNameError` for a prefix of several ids.
        """
        ...

    # Compile jobs -------------------------------------------------------------------------

    def enqueue_job(
        self, blueprint_id: str, target: KernelTarget, *, init_seed: int = 0
    ) -> CompileJob:
        """Queue a compile of a submitted blueprint for ``target``.

        While a job for the same (blueprint, target, seed) is still queued or claimed, that job
        is returned instead of a duplicate.
        """
        ...

    def claim_job(
        self, worker_id: str, *, lease_seconds: float = DEFAULT_LEASE_SECONDS
    ) -> CompileJob | None:
        """Atomically claim the oldest claimable job for ``worker_id``, or return ``None``.

        A job is claimable when QUEUED, or CLAIMED with a lapsed lease (its worker died). Among
        any number of concurrent claimers, each job is handed to exactly one.
        """
        ...

    def renew_lease(
        self, job_id: str, worker_id: str, *, lease_seconds: float = DEFAULT_LEASE_SECONDS
    ) -> CompileJob:
        """Extend the lease of a job that ``worker_id`` holds (for compiles that run long)."""
        ...

    def complete_job(self, job_id: str, worker_id: str, kernel_id: str) -> CompileJob:
        """Mark a claimed job SUCCEEDED with the stored kernel it produced.

        Raises :class:`~esper.urza.errors.JobStateError` when ``worker_id`` does not hold the job
        (its lease lapsed and another worker reclaimed it) and
        :class:`~esper.errors.KernelNotFoundError` when the kernel was not put first. A
        SUBMITTED blueprint becomes VALID. Repeating the same call returns the job unchanged.
        """
        ...

    def fail_job(self, job_id: str, worker_id: str, error: str) -> CompileJob:
        """Mark a claimed job FAILED with a message saying why (cut to fit, NULs escaped)."""
        ...

    def get_job(self, job_id: str) -> CompileJob:
        """One compile job."""
        ...

    def list_jobs(
        self,
        status: CompileJobStatus | None = None,
        *,
        blueprint_id: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[CompileJob]:
        """Compile jobs, oldest first, optionally filtered by status and blueprint (a page)."""
        ...

    # Library ------------------------------------------------------------------------------

    def stats(self) -> LibraryStats:
        """Counts of blueprints and jobs by status, and of kernels and their bytes."""
        ...

    def close(self) -> None:
        """Release connections; the library is unusable afterwards."""
        ...
