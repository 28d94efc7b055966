"""Distributed runs: ``esper train`` under ``torchrun``, one model replica per rank.

Launch with ``esper train --config configs/digits.yaml --nproc 2`` (which re-executes itself
under ``torch.distributed.run``, see :mod:`esper.tolaria.launcher`) or directly::

    torchrun --nproc_per_node 2 -m esper.cli train --config configs/digits.yaml

Every rank trains on its slice of each global batch under DDP; rank 0 polls the controller and
its decisions are broadcast; kernels are grafted in lockstep (:class:`esper.core.lockstep.
LockstepGrowth`) and the DDP wrapper is rebuilt after each graft. Only rank 0 writes the run
folder. :class:`TrainingReplica` is all of this behind one object (and, without ``torchrun``,
the plain model behind the same interface), so the run loop reads the same either way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from esper.contracts import AdaptationDecision, HealthSignal
from esper.core import MorphableModel
from esper.core.lockstep import LockstepGrowth

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankContext:
    """This process's place in a ``torchrun`` launch."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """Whether this rank writes the run folder and runs the controller."""
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> RankContext | None:
        """Join the process group ``torchrun`` set up (``None`` when not launched by it)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return None
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size())

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch of example indices."""
        return batch[self.rank :: self.world_size]

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over all ranks (the same on every rank)."""
        total = value.detach().reshape(1).clone()
        dist.all_reduce(total)
        return float(total) / self.world_size

    def close(self) -> None:
        """Leave the process group."""
        if dist.is_initialized():
            dist.destroy_process_group()


class TrainingReplica:
    """This process's model as the run loop drives it: the model itself, or (under ``torchrun``)
    a DDP replica kept in lockstep with the other ranks.

    Args:
        model: the wrapped model (its state restored, if resumed: DDP starts from rank 0's).
        ranks: this process's place in a ``torchrun`` launch (``None``: one process).
    """

    def __init__(self, model: MorphableModel, ranks: RankContext | None = None) -> None:
        self.model = model
        self.ranks = ranks
        self.lockstep = LockstepGrowth(model) if ranks is not None else None
        self.module: torch.nn.Module = self.lockstep.ddp() if self.lockstep else model
        """What the forward runs on (the DDP wrapper, rebuilt after structural changes)."""

    @property
    def decides(self) -> bool:
        """Whether this rank asks the controller (the others receive its decisions)."""
        return self.lockstep is None or self.lockstep.rank == self.lockstep.src

    def __call__(self, inputs: torch.Tensor) -> Any:
        """The forward pass on this replica."""
        return self.module(inputs)

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch of example indices (all of it in one process)."""
        return self.ranks.shard(batch) if self.ranks is not None else batch

    def step(self, *, graftable: Mapping[str, Collection[int]] | None) -> int:
        """The step boundary (every rank grafts the same kernels at the same one); returns the
        new step."""
        if self.lockstep is None:
            return self.model.step(graftable=graftable)
        if self.lockstep.step(allowed=graftable):
            self.module = self.lockstep.ddp()  # DDP registers parameters when it is built
        return self.model.global_step

    def mean(self, loss: torch.Tensor) -> float:
        """The step's loss, averaged over the ranks (read from the device here)."""
        return self.ranks.mean(loss) if self.ranks is not None else float(loss.detach())

    def step_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The step's loss, detached and averaged over the ranks, left on the device (no read)."""
        if self.ranks is None:
            return loss.detach()
        total = loss.detach().reshape(()).clone()
        dist.all_reduce(total)
        return total / self.ranks.world_size

    def collect_telemetry(self) -> list[HealthSignal]:
        """Health signals, from accumulators averaged over the ranks."""
        if self.lockstep is not None:
            return self.lockstep.collect_telemetry()
        return self.model.collect_telemetry()

    def share_decisions(
        self, decisions: Sequence[AdaptationDecision]
    ) -> Sequence[AdaptationDecision]:
        """The deciding rank's ``decisions``, on every rank (others pass an empty sequence)."""
        return self.lockstep.broadcast(decisions) if self.lockstep is not None else decisions

    def summary(self) -> dict[str, Any]:
        """For ``run.json`` at the end of a distributed run: the world size and whether every
        replica ended bit-identical (empty in one process)."""
        if self.lockstep is None:
            return {}
        return {
            "world_size": self.lockstep.world_size,
            "replicas_identical": self.lockstep.replicas_identical(),
        }

    def close(self) -> None:
        """Leave the process group (if any)."""
        if self.ranks is not None:
            self.ranks.close()
