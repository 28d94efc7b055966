"""Distributed runs: ``esper train`` under ``torchrun``, one model replica per rank.

Launch with ``esper train --config configs/digits.yaml --nproc 2`` (which re-executes itself
under ``torch.distributed.run``, see :mod:`esper.tolaria.launcher`) or directly::

    torchrun --nproc_per_node 2 -m esper.cli train --config configs/digits.yaml

Every rank trains on its slice of each global batch under DDP; rank 0 runs Tamiyo and its
decisions are broadcast; kernels are grafted in lockstep (:class:`esper.core.lockstep.LockstepGrowth`)
and the DDP wrapper is rebuilt after each graft. Only rank 0 writes the run folder.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

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
