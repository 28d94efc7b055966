"""Controller feed: what the training side publishes so a controller in another process can decide.

The model's :class:`~esper.contracts.ModelTopology` once (on ``telemetry.topology``), and every
``every_steps`` steps a :class:`~esper.contracts.TrainingProgress` (on ``telemetry.progress``):
the step, the mean training loss since the last one, and the base and kernel parameter counts
(kept current by the model's graft and removal callbacks, without a walk over the model). Both
go through a :class:`~esper.oona.BackgroundPublisher`, so publishing never blocks a step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn

from esper.contracts import Contract, Topic, TrainingProgress
from esper.core import MorphableModel
from esper.oona import BackgroundPublisher
from esper.tamiyo.topology import model_topology
from esper.tolaria.germination import Loss, materialize


class ControllerFeed:
    """Publishes a run's topology and progress.

    Args:
        model: the morphable model being trained.
        run_id: the run (tags every message).
        publisher: where to publish (``None``: nothing is published, the counts are kept).
        total_steps: the run's length in steps (published with the progress).
        every_steps: publish the progress every this many steps.
    """

    def __init__(
        self,
        model: MorphableModel,
        *,
        run_id: str,
        publisher: BackgroundPublisher | None,
        total_steps: int | None,
        every_steps: int,
    ) -> None:
        self.run_id = run_id
        self.publisher = publisher
        self.total_steps = total_steps
        self.every_steps = every_steps
        self.base_parameters = sum(p.numel() for p in model.base_parameters())
        self.kernel_parameters = sum(p.numel() for p in model.kernel_parameters())
        self._losses: list[Loss] = []
        model.on_kernel_grafted(self._count_kernel(+1))  # kept current without a model walk
        model.on_kernel_removed(self._count_kernel(-1))
        self.publish(Topic.TELEMETRY_TOPOLOGY, model_topology(model, run_id=run_id))

    def _count_kernel(self, sign: int) -> Callable[[str, int, nn.Module], None]:
        def count(layer_name: str, seed_idx: int, module: nn.Module) -> None:
            self.kernel_parameters += sign * sum(p.numel() for p in module.parameters())

        return count

    def publish(self, topic: str, message: Contract) -> None:
        """Publish ``message`` on ``topic`` in the background (nothing without a publisher)."""
        if self.publisher is not None:
            self.publisher.publish(topic, message)

    def on_step(self, step: int, loss: Loss | None) -> None:
        """Count this step's loss; publish the progress when ``step`` is due."""
        if loss is not None:
            self._losses.append(loss)
        if step % self.every_steps == 0:
            losses = materialize(self._losses)
            self._losses = []
            finite = [x for x in losses if math.isfinite(x)]
            self.publish(
                Topic.TELEMETRY_PROGRESS,
                TrainingProgress(
                    run_id=self.run_id,
                    step=step,
                    total_steps=self.total_steps,
                    loss=sum(finite) / len(finite) if finite else None,
                    base_parameters=self.base_parameters,
                    kernel_parameters=self.kernel_parameters,
                ),
            )

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, then stop the publisher."""
        if self.publisher is not None:
            self.publisher.close(timeout)

    def state_dict(self) -> dict[str, Any]:
        """The losses not published yet (read here, once)."""
        return {"progress_losses": materialize(self._losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._losses = [float(x) for x in state["progress_losses"]]
