"""Artifact-library contracts: blueprint records, compile jobs and library statistics (Urza)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from esper.contracts.base import Contract
from esper.contracts.kernels import BlueprintSpec, KernelId, KernelTarget


class BlueprintStatus(StrEnum):
    """Where a blueprint stands in the compile pipeline."""

    SUBMITTED = "submitted"
    """Stored; no compile has finished yet."""
    VALID = "valid"
    """At least one compile produced a validated kernel."""
    INVALID = "invalid"
    """A compile failed validation; ``reason`` says why."""


class BlueprintRecord(Contract):
    """A blueprint as stored in the library."""

    blueprint_id: KernelId
    spec: BlueprintSpec
    name: str | None = Field(default=None, max_length=200)
    status: BlueprintStatus = BlueprintStatus.SUBMITTED
    reason: str | None = None
    created_at: float


class CompileJobStatus(StrEnum):
    """Life of a compile job: queued, claimed by one worker, then succeeded or failed."""

    QUEUED = "queued"
    CLAIMED = "claimed"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class CompileJob(Contract):
    """A request to compile one blueprint for one target layer geometry.

    A worker claims a QUEUED job for ``lease_seconds``; a CLAIMED job whose lease lapsed (its
    worker died mid-compile) can be claimed again, which increments ``attempts``.
    """

    job_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    blueprint_id: KernelId
    target: KernelTarget
    init_seed: int = 0
    status: CompileJobStatus = CompileJobStatus.QUEUED
    attempts: int = Field(default=0, ge=0)
    worker_id: str | None = None
    claimed_at: float | None = None
    lease_expires_at: float | None = Field(
        default=None,
        description="while CLAIMED: when the claim lapses and another worker may reclaim the job",
    )
    kernel_id: KernelId | None = None
    error: str | None = None
    created_at: float


class LibraryStats(Contract):
    """Counts of what the library holds."""

    blueprints_by_status: dict[BlueprintStatus, int]
    kernels: int
    kernel_bytes: int
    jobs_by_status: dict[CompileJobStatus, int]
