"""Germinations: one GERMINATE decision's record on its way from decision to verdict.

The growth executor (:mod:`esper.tolaria.growth_executor`) keeps one :class:`Germination` per
decision it accepted and moves it through the stages of :class:`GerminationStage`::

    RESOLVING ─► (RESOLVED) ─► LOADING ─► BLENDING ─► EVALUATING ─► judged (record dropped)
    kernel looked up   prefetched   seed LOADING   grafted     seed ACTIVE

``RESOLVED`` is used with a graft delay only: the kernel is known and in the kernel cache, and
the record waits for its due step. A record's :meth:`~Germination.state_dict` is plain JSON;
:meth:`Germination.from_state` brings it back, a germination that had not been grafted yet
starting again from the kernel lookup (the model's checkpoint brings a LOADING seed back
DORMANT).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import torch

from esper.contracts import AdaptationDecision, KernelMetadata
from esper.core import MorphableModel
from esper.execution.state_layout import SeedSlot
from esper.tolaria.graft_judgement import GraftEvidence

Loss = float | torch.Tensor
"""A step's training loss: a Python float, or a scalar tensor (read only at evaluation time)."""


class GerminationStage(StrEnum):
    """Where a germination is (the values are what checkpoints store)."""

    RESOLVING = "resolving"
    """Looking up or compiling the kernel (background)."""
    RESOLVED = "resolved"
    """With a graft delay: kernel known and prefetched, waiting for the due step."""
    LOADING = "loading"
    """``model.request_kernel`` issued; grafted at a step boundary."""
    BLENDING = "blending"
    """Grafted; alpha ramping up."""
    EVALUATING = "evaluating"
    """ACTIVE; counting the evaluation window's steps."""

    @property
    def grafted(self) -> bool:
        """Whether the kernel is in the model (BLENDING or EVALUATING)."""
        return self in (GerminationStage.BLENDING, GerminationStage.EVALUATING)

    @property
    def waiting_for_kernel(self) -> bool:
        """Whether the kernel is still being looked up or compiled (RESOLVING)."""
        return self is GerminationStage.RESOLVING


@dataclass
class Germination:
    """One GERMINATE decision on its way through the pipeline.

    Attributes:
        decision: the decision.
        seed_idx: the seed it took (the decision's, or another DORMANT one of the layer).
        stage: where it is.
        received_step: the step boundary the executor took the decision in at.
        due_step: with a graft delay, the step whose boundary grafts it.
        kernel: the kernel's metadata, once resolved.
        resolving: the background lookup / compile (a future of the kernel's metadata).
        loading: the model's load of the kernel into the seed.
        prefetch: with a graft delay, the kernel cache's load ahead of the due step.
        grafted_step: the step the kernel was grafted at.
        active_step: the step the seed became ACTIVE at (its evaluation window starts).
        losses_before: training losses of the steps before the graft (the baseline).
        losses_after: training losses of the evaluation window.
        metrics_before: the validation hook's metrics at graft time.
        step_times_before: step wall times before the graft.
        step_times_after: step wall times of the evaluation window.
    """

    decision: AdaptationDecision
    seed_idx: int
    stage: GerminationStage
    received_step: int
    due_step: int | None = None
    kernel: KernelMetadata | None = None
    resolving: Future[KernelMetadata] | None = None
    loading: Future[Any] | None = None
    prefetch: Future[Any] | None = None
    grafted_step: int | None = None
    active_step: int | None = None
    losses_before: list[Loss] = field(default_factory=list)
    losses_after: list[Loss] = field(default_factory=list)
    metrics_before: dict[str, float] = field(default_factory=dict)
    step_times_before: list[float] = field(default_factory=list)
    step_times_after: list[float] = field(default_factory=list)

    @property
    def layer_name(self) -> str:
        """The layer the decision grows."""
        return self.decision.layer_name

    def state_dict(self) -> dict[str, Any]:
        """The record as plain JSON (pending loss tensors are read here, in one transfer each)."""
        return {
            "decision": self.decision.model_dump(mode="json"),
            "seed_idx": self.seed_idx,
            "stage": str(self.stage),
            "received_step": self.received_step,
            "due_step": self.due_step,
            "kernel": self.kernel.model_dump(mode="json") if self.kernel else None,
            "grafted_step": self.grafted_step,
            "active_step": self.active_step,
            "losses_before": materialize(self.losses_before),
            "losses_after": materialize(self.losses_after),
            "metrics_before": dict(self.metrics_before),
            "step_times_before": list(self.step_times_before),
            "step_times_after": list(self.step_times_after),
        }

    @classmethod
    def from_state(cls, saved: dict[str, Any]) -> Germination:
        """The record :meth:`state_dict` saved. One saved before its graft comes back RESOLVING,
        without a kernel: its owner starts the lookup again."""
        stage = GerminationStage(saved["stage"])
        restart = not stage.grafted
        return cls(
            decision=AdaptationDecision.model_validate(saved["decision"]),
            seed_idx=int(saved["seed_idx"]),
            stage=GerminationStage.RESOLVING if restart else stage,
            received_step=int(saved["received_step"]),
            due_step=saved["due_step"],
            kernel=None
            if restart or saved["kernel"] is None
            else KernelMetadata.model_validate(saved["kernel"]),
            grafted_step=saved["grafted_step"],
            active_step=saved["active_step"],
            losses_before=[float(x) for x in saved["losses_before"]],
            losses_after=[float(x) for x in saved["losses_after"]],
            metrics_before={str(k): float(v) for k, v in saved["metrics_before"].items()},
            step_times_before=[float(x) for x in saved["step_times_before"]],
            step_times_after=[float(x) for x in saved["step_times_after"]],
        )


class RecentSteps:
    """The last ``size`` training losses and step wall times (the baseline of the next graft)."""

    def __init__(self, size: int) -> None:
        self.losses: deque[Loss] = deque(maxlen=size)
        self.step_times: deque[float] = deque(maxlen=size)
        self._last_step_at: float | None = None

    def record(self, loss: Loss | None) -> float | None:
        """Count a step: its loss, and the wall time since the previous one (returned)."""
        if loss is not None:
            self.losses.append(loss)
        now = time.perf_counter()
        interval = None if self._last_step_at is None else now - self._last_step_at
        self._last_step_at = now
        if interval is not None:
            self.step_times.append(interval)
        return interval

    def restore_losses(self, losses: Iterable[float]) -> None:
        """Put saved losses back (step times are wall time: not saved)."""
        self.losses = deque(losses, maxlen=self.losses.maxlen)


def materialize(losses: list[Loss]) -> list[float]:
    """Losses as floats, reading any tensors in one transfer."""
    tensors = [x for x in losses if isinstance(x, torch.Tensor)]
    if not tensors:
        return [float(x) for x in losses]
    values = iter(torch.stack([t.float().reshape(()) for t in tensors]).tolist())
    return [next(values) if isinstance(x, torch.Tensor) else float(x) for x in losses]


class EvaluationWindow(Protocol):
    """What a graft under evaluation records (a kernel's :class:`Germination`, a widen's or
    deepen's record alike)."""

    decision: AdaptationDecision
    losses_before: list[Loss]
    losses_after: list[Loss]
    metrics_before: dict[str, float]
    step_times_before: list[float]
    step_times_after: list[float]


def window_evidence(
    window: EvaluationWindow,
    step: int,
    *,
    metrics_after: Mapping[str, float],
    kernel_parameters: int,
    base_parameters: int,
    faults: int = 0,
    still_active: bool = True,
) -> GraftEvidence:
    """The evidence :func:`~esper.tolaria.graft_judgement.judge_graft` weighs when ``window``
    ends at ``step`` (its losses read in one transfer)."""
    return GraftEvidence(
        decision=window.decision,
        step=step,
        losses_before=materialize(window.losses_before),
        losses_after=materialize(window.losses_after),
        metrics_before=window.metrics_before,
        metrics_after=metrics_after,
        step_times_before=window.step_times_before,
        step_times_after=window.step_times_after,
        kernel_parameters=kernel_parameters,
        base_parameters=base_parameters,
        faults=faults,
        still_active=still_active,
    )


def seed_slot(model: MorphableModel, layer_name: str, seed_idx: int) -> SeedSlot:
    """The host-side facts of one seed (its kernel id, its fault count): the one place Tolaria
    reads them."""
    return model.layer(layer_name).seed_layout.slots[seed_idx]
