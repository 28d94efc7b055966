"""Run progress: what a controller knows of its run's training, and the run-level features.

The training side reports its step, loss and parameter counts as
:class:`~esper.contracts.TrainingProgress` (on ``telemetry.progress``, or fed directly in
process). :class:`RunProgress` keeps the newest report, the training budget and the recent
losses, and turns them into the policy's :class:`~esper.tamiyo.graph.GlobalState`: the loss is
the mean of the newer half of the last 20 losses, its trend the relative change from the older
half.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from esper.contracts import TrainingProgress
from esper.tamiyo.graph import GlobalState

LOSS_WINDOW = 20
"""Recent training losses the loss features are computed from."""


class RunProgress:
    """The newest progress report of run ``run_id``, its budget and its recent losses.

    Args:
        run_id: the run.
        total_steps: the run's training budget in steps, if known (a report may set it later).
    """

    def __init__(self, run_id: str, total_steps: int | None) -> None:
        self.run_id = run_id
        self.total_steps = total_steps
        self.base_parameters = 0
        """Parameters of the host model (from the model, its topology or a report)."""
        self.latest: TrainingProgress | None = None
        self._losses: deque[float] = deque(maxlen=LOSS_WINDOW)

    @property
    def step(self) -> int | None:
        """The step of the newest report."""
        return self.latest.step if self.latest is not None else None

    @property
    def kernel_parameters(self) -> int:
        """Grafted kernel parameters as of the newest report (0 before any)."""
        return self.latest.kernel_parameters if self.latest is not None else 0

    def record(
        self, step: int, *, loss: float | None, total_steps: int | None, kernel_parameters: int
    ) -> None:
        """Record a step fed in process (a non-finite loss is not a loss feature)."""
        if total_steps is not None:
            self.total_steps = total_steps
        finite = loss is not None and math.isfinite(loss)
        if finite:
            self._losses.append(float(loss))  # type: ignore[arg-type]
        self.latest = TrainingProgress(
            run_id=self.run_id,
            step=step,
            total_steps=self.total_steps,
            loss=loss if finite else None,
            base_parameters=self.base_parameters,
            kernel_parameters=kernel_parameters,
        )

    def observe(self, report: TrainingProgress) -> None:
        """Take in a report from the bus; one older than the newest is ignored."""
        if self.latest is not None and report.step < self.latest.step:
            return
        if report.total_steps is not None:
            self.total_steps = report.total_steps
        if report.loss is not None and math.isfinite(report.loss):
            self._losses.append(report.loss)
        self.base_parameters = self.base_parameters or report.base_parameters
        self.latest = report

    def global_state(self, step: int, *, kernel_parameters: int, adaptations: int) -> GlobalState:
        """The run-level features at ``step``."""
        losses = list(self._losses)
        half = len(losses) // 2
        loss = sum(losses[half:]) / len(losses[half:]) if losses else 0.0
        trend = 0.0
        if half:
            earlier = sum(losses[:half]) / half
            trend = (loss - earlier) / max(abs(earlier), 1e-8)
        base = self.base_parameters
        return GlobalState(
            progress=min(1.0, step / self.total_steps) if self.total_steps else 0.0,
            kernel_parameter_fraction=kernel_parameters / base if base else 0.0,
            adaptations=float(adaptations),
            loss=loss,
            loss_trend=trend,
        )

    def state_dict(self) -> dict[str, Any]:
        """``losses``, ``total_steps`` and ``progress`` (the newest report) as JSON."""
        return {
            "losses": list(self._losses),
            "total_steps": self.total_steps,
            "progress": self.latest.model_dump(mode="json") if self.latest else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._losses = deque((float(x) for x in state["losses"]), maxlen=LOSS_WINDOW)
        self.total_steps = state["total_steps"]
        progress = state["progress"]
        self.latest = TrainingProgress.model_validate(progress) if progress else None
