"""Step log: what the run loop records after each step and each epoch (metrics and observer).

:class:`StepLog` writes, after every step, the seeds whose state changed (``seed`` records), the
step's growth events, and every ``train.log_every`` steps a ``step`` record; it tells the
observer each event and each step. At an epoch's end :meth:`StepLog.epoch` writes the ``epoch``
record. The record types are described in :mod:`esper.tolaria.metrics`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from esper.contracts import SeedState
from esper.core import MorphableModel
from esper.tolaria.growth_events import Event
from esper.tolaria.metrics import MetricsLog
from esper.tolaria.progress import RunObserver


def seed_counts(model: MorphableModel) -> dict[str, int]:
    """Seeds by state name (host mirror, no device read)."""
    counts: Counter[str] = Counter()
    for name in model.layer_names:
        counts.update(state.name for state in model.layer(name).seed_states)
    return {state.name: counts[state.name] for state in SeedState if counts[state.name]}


def seed_snapshot(model: MorphableModel) -> dict[tuple[str, int], str]:
    """Every seed's state name, by ``(layer, seed)``."""
    return {
        (name, i): state.name
        for name in model.layer_names
        for i, state in enumerate(model.layer(name).seed_states)
    }


def parameter_count(model: MorphableModel) -> int:
    """Base plus grafted kernel parameters."""
    return sum(p.numel() for p in model.parameters())


class StepLog:
    """Records a run's steps and epochs.

    Args:
        metrics: the run's metrics log.
        observer: the run's observer.
        model: the wrapped model (its seed states are compared step to step).
        log_every: write a ``step`` record every this many steps.
        regression: the task is a regression (no accuracy).
        score_name: the test score's name (``accuracy`` or ``r2``).
    """

    def __init__(
        self,
        metrics: MetricsLog,
        observer: RunObserver,
        model: MorphableModel,
        *,
        log_every: int,
        regression: bool,
        score_name: str,
    ) -> None:
        self.metrics = metrics
        self.observer = observer
        self.model = model
        self.log_every = log_every
        self.regression = regression
        self.score_name = score_name
        self._states = seed_snapshot(model)
        self._parameters = parameter_count(model)

    def initial(self, test_loss: float, test_score: float) -> None:
        """A new run's epoch-0 evaluation and every seed's initial state."""
        self.metrics.write("eval", epoch=0, step=0, test_loss=test_loss, test_score=test_score)
        for (layer, seed), state in self._states.items():
            self.metrics.write("seed", step=0, layer=layer, seed=seed, state=state)

    def step(
        self,
        step: int,
        epoch: int,
        loss: float | torch.Tensor,
        outputs: torch.Tensor,
        targets: torch.Tensor,
        step_ms: float,
        compiling: int,
        events: Sequence[Event],
    ) -> None:
        """Record one step: seed-state changes, growth events, the ``step`` record when due.

        Args:
            step: the step.
            epoch: its epoch.
            loss: its training loss (the mean over the ranks; a device scalar is read only on
                steps that write a ``step`` record, so other steps never wait for the device).
            outputs: the batch's outputs (for the accuracy).
            targets: the batch's targets.
            step_ms: its wall time in milliseconds.
            compiling: compiles in flight during it.
            events: the growth events of its boundary.
        """
        states = seed_snapshot(self.model)
        if states != self._states:
            for key, state in states.items():
                if self._states.get(key) != state:
                    self.metrics.write("seed", step=step, layer=key[0], seed=key[1], state=state)
            self._states = states
            self._parameters = parameter_count(self.model)
        for event in events:
            self.metrics.write(event["type"], **{k: v for k, v in event.items() if k != "type"})
            self.observer.on_event(event)
        counts = seed_counts(self.model)
        shown: float | None = None
        if step % self.log_every == 0:
            shown, accuracy = self._read(loss, outputs, targets)
            self.metrics.write(
                "step",
                step=step,
                epoch=epoch,
                loss=shown,
                accuracy=accuracy,
                step_time_ms=step_ms,
                parameters=self._parameters,
                seeds=counts,
                compiling=compiling,
            )
        self.observer.on_step(step=step, loss=shown, seeds=counts)

    def _read(
        self, loss: float | torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[float, float | None]:
        """The loss and the batch accuracy as floats, in one transfer from the device."""
        if self.regression:
            return float(loss), None
        correct = (outputs.detach().argmax(dim=1) == targets).float().mean()
        if not isinstance(loss, torch.Tensor) or loss.dtype != correct.dtype:
            return float(loss), float(correct)
        values = torch.stack([loss.detach().reshape(()).to(correct.dtype), correct]).tolist()
        return values[0], values[1]

    def epoch(
        self, epoch: int, train_loss: float, test_loss: float, test_score: float, *, wall_s: float
    ) -> dict[str, Any]:
        """Write (and return) the ``epoch`` record of an evaluated epoch."""
        record: dict[str, Any] = {
            "epoch": epoch,
            "step": self.model.global_step,
            "train_loss": train_loss,
            "test_loss": test_loss,
            "test_score": test_score,
            "score_name": self.score_name,
            "parameters": parameter_count(self.model),
            "seeds": seed_counts(self.model),
            "layers": {
                name: [s.name for s in self.model.layer(name).seed_states]
                for name in self.model.layer_names
            },
            "wall_s": wall_s,
        }
        self.metrics.write("epoch", **record)
        return record
