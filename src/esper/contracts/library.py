"""Artifact-library contracts: blueprint records, compile jobs and library statistics (Urza)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from esper.contracts.base import Contract
from esper.contracts.bounds import Count, InitSeed, Name, Text, Timestamp
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
    name: Name | None = None
    status: BlueprintStatus = BlueprintStatus.SUBMITTED
    reason: Text | None = None
    created_at: Timestamp


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
    init_seed: InitSeed = 0
    status: CompileJobStatus = CompileJobStatus.QUEUED
    attempts: int = Field(default=0, ge=0, le=2**31 - 1)
    worker_id: Name | None = None
    claimed_at: Timestamp | None = None
    lease_expires_at: Timestamp | None = Field(
        default=None,
        description="while CLAIMED: when the claim lapses and another worker may reclaim the job",
    )
    kernel_id: KernelId | None = None
    error: Text | None = None
    created_at: Timestamp


class LibraryStats(Contract):
    """Counts of what the library holds."""

    blueprints_by_status: dict[BlueprintStatus, Count]
    kernels: Count
    kernel_bytes: Count
    jobs_by_status: dict[CompileJobStatus, Count]
