"""Message-bus contracts: topics, the envelope every message travels in, and their payloads."""

from __future__ import annotations

import time
import uuid
from enum import StrEnum
from typing import Any

from pydantic import ConfigDict, Field

from esper.contracts.base import Contract
from esper.contracts.bounds import InitSeed, Name, Step, Text, Timestamp
from esper.contracts.kernels import KernelId, KernelTarget
from esper.contracts.telemetry import HealthSignal


class Topic(StrEnum):
    """Topics on the Oona message bus."""

    TELEMETRY_HEALTH = "telemetry.health"
    """Batches of :class:`HealthSignal` flushed by a training process."""
    TELEMETRY_TOPOLOGY = "telemetry.topology"
    """A training run's seeded structure (:class:`ModelTopology`), once per run."""
    TELEMETRY_PROGRESS = "telemetry.progress"
    """A training run's step, loss and parameter counts (:class:`TrainingProgress`)."""
    KERNEL_READY = "kernel.ready"
    """A compiled kernel was stored in Urza (:class:`KernelReady`)."""
    KERNEL_FAILED = "kernel.failed"
    """A compile job ended FAILED: no kernel will come from it (:class:`KernelFailed`)."""
    CONTROL_KASMINA_COMMANDS = "control.kasmina.commands"
    """Adaptation decisions for the training side to apply at a step boundary."""
    CONTROL_TAMIYO_REFUSALS = "control.tamiyo.refusals"
    """Decisions a safety gate refused (:class:`DecisionRefusal`)."""
    CONTROL_TAMIYO_REWARDS = "control.tamiyo.rewards"
    """Rewards of adaptations after their evaluation window (:class:`RewardReport`)."""


def _new_event_id() -> str:
    return uuid.uuid4().hex


class Envelope(Contract):
    """One message on the bus: routing and tracing fields around a JSON payload.

    ``payload_type`` names the contract the payload validates against (for example
    ``"HealthSignalBatch"``) so a consumer can decode it without guessing.

    In JSON a non-finite float of the payload (a diverged layer's NaN output mean) is written as
    the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"`` — valid JSON that validates back into
    the same float — instead of ``null``, which would make the whole message undecodable.
    """

    model_config = ConfigDict(ser_json_inf_nan="strings")

    event_id: str = Field(default_factory=_new_event_id, pattern=r"^[0-9a-f]{32}$")
    topic: str = Field(pattern=r"^[a-z][a-z0-9_.-]{0,127}$")
    sender: Name
    timestamp: Timestamp = Field(default_factory=time.time)
    trace_id: str = Field(default_factory=_new_event_id, pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    payload_type: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,99}$")
    payload: dict[str, Any]


class HealthSignalBatch(Contract):
    """Payload of ``telemetry.health``: one telemetry flush of one training process."""

    run_id: Name
    step: Step
    signals: tuple[HealthSignal, ...] = Field(max_length=100_000)


class KernelReady(Contract):
    """Payload of ``kernel.ready``: a kernel compiled from a blueprint for a target is in Urza."""

    kernel_id: KernelId
    blueprint_id: KernelId
    target: KernelTarget
    job_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")


class KernelFailed(Contract):
    """Payload of ``kernel.failed``: a compile job ended FAILED, so no kernel will come from it.

    ``error`` says why: the blueprint failed validation, the compiler crashed, the library
    refused the compiled artifact (too large, metadata not describing the bytes), or the job was
    abandoned after too many attempts. Whoever waits for the job stops waiting.
    """

    job_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    blueprint_id: KernelId
    target: KernelTarget
    init_seed: InitSeed = 0
    error: Text
