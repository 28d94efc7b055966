"""Lockstep growth: keep a morphable model's growth identical on every rank of a process group.

Under ``torchrun`` + DDP every rank holds a replica of the model. Growth must happen to all
replicas at the same step or they diverge. :class:`LockstepGrowth` provides the three pieces:

* :meth:`~LockstepGrowth.broadcast`: the source rank's decisions reach every rank (as JSON in a
  ``uint8`` tensor: nothing is pickled);
* :meth:`~LockstepGrowth.step`: the step boundary, at which a kernel is grafted only once its
  load has finished on *every* rank (one small all-reduce while loads are pending), after which
  the seed states are checked to agree and any seed that diverged is culled everywhere;
* :meth:`~LockstepGrowth.collect_telemetry`: health accumulators averaged across ranks before
  they are read, so every rank quarantines the same seeds.

After a step that changed the model's structure, rebuild the DDP wrapper (:meth:`ddp`): DDP
registers parameters when it is built, so a grafted kernel's parameters would otherwise never be
synchronised. Kernel artifacts are deterministic, so every rank grafts identical weights.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from esper.contracts import AdaptationDecision, HealthSignal, SeedState
from esper.core.model_wrapper import MorphableModel
from esper.errors import ConfigurationError

logger = logging.getLogger(__name__)


_RANK_LOCAL_BUFFERS = ("seed_state.layer_health", "seed_state.seed_health")
"""Buffers that accumulate each rank's own batches between telemetry reads."""


def broadcast_json(value: Any, *, src: int = 0, group: Any = None, device: Any = "cpu") -> Any:
    """The source rank's JSON-able ``value`` on every rank (sent as UTF-8 bytes in a ``uint8``
    tensor: nothing is pickled; other ranks' ``value`` is ignored)."""
    payload = json.dumps(value).encode() if dist.get_rank(group) == src else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(size, src, group=group)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if payload:
        buffer.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    if len(buffer):
        dist.broadcast(buffer, src, group=group)
    return json.loads(bytes(buffer.cpu().tolist()))


class LockstepGrowth:
    """Coordinates one :class:`MorphableModel` replica per rank.

    Args:
        model: this rank's replica (identical initial weights on every rank).
        group: the process group (default: the world).
        src: the rank whose decisions are broadcast (where Tamiyo runs).
    """

    def __init__(self, model: MorphableModel, *, group: Any = None, src: int = 0) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigurationError(
                "LockstepGrowth needs an initialised torch.distributed process group: launch with "
                "torchrun and call torch.distributed.init_process_group() first"
            )
        self.model = model
        self.group = group
        self.src = src
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._structure = self._structure_signature()
        self._device = next(iter(model.parameters())).device

    # -- decisions -----------------------------------------------------------------------------

    def broadcast(self, decisions: Sequence[AdaptationDecision] | None) -> list[AdaptationDecision]:
        """Every rank gets the source rank's ``decisions`` (other ranks pass ``None``)."""
        payload = [d.model_dump(mode="json") for d in decisions or ()]
        received = broadcast_json(payload, src=self.src, group=self.group, device=self._device)
        return [AdaptationDecision.model_validate(item) for item in received]

    # -- step boundary -------------------------------------------------------------------------

    def step(self, *, allowed: Mapping[str, Collection[int]] | None = None) -> bool:
        """The step boundary on every rank; returns whether the model's structure changed
        (then rebuild the DDP wrapper with :meth:`ddp`).

        Args:
            allowed: seeds the caller allows to graft now (e.g. a deterministic schedule), by
                layer name; ``None``: any. A seed is grafted only if allowed and loaded on every
                rank.
        """
        pending = self.model.pending_loads()
        graftable: dict[str, set[int]] = {}
        if pending:
            finished = torch.tensor(
                [
                    int(done and (allowed is None or seed_idx in allowed.get(layer_name, ())))
                    for layer_name, seed_idx, done in pending
                ],
                dtype=torch.int64,
                device=self._device,
            )
            dist.all_reduce(finished, op=dist.ReduceOp.MIN, group=self.group)
            for (layer_name, seed_idx, _), everywhere in zip(
                pending, finished.tolist(), strict=True
            ):
                if everywhere:
                    graftable.setdefault(layer_name, set()).add(seed_idx)
        self.model.step(graftable=graftable)
        if pending or self._structure != self._structure_signature():
            self._reconcile()
        structure = self._structure_signature()
        changed = structure != self._structure
        self._structure = structure
        return changed

    def _reconcile(self) -> None:
        """Cull, on every rank, any seed whose state is not the same on all ranks."""
        states = torch.tensor(
            [int(s) for layer in self._layers() for s in layer.seed_states],
            dtype=torch.int64,
            device=self._device,
        )
        low, high = states.clone(), states.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=self.group)
        if torch.equal(low, high):
            return
        flat = 0
        for layer in self._layers():
            for seed_idx, state in enumerate(layer.seed_states):
                if low[flat] != high[flat] and state is not SeedState.DORMANT:
                    logger.warning(
                        "rank %d: layer %r seed %d diverged across ranks (%s here); culling it",
                        self.rank,
                        layer.layer_name,
                        seed_idx,
                        state.name,
                    )
                    if state is SeedState.FOSSILIZED:
                        layer.seed_layout.transition(
                            seed_idx, SeedState.ERROR_RECOVERY, where=layer.layer_name
                        )
                    layer.unload(seed_idx)
                flat += 1

    def _layers(self) -> list[Any]:
        return [self.model.layer(name) for name in self.model.layer_names]

    def _structure_signature(self) -> tuple[tuple[str, int, str | None], ...]:
        seeds = tuple(
            (layer.layer_name, seed_idx, slot.kernel_id if slot.state.runs_kernel else None)
            for layer in self._layers()
            for seed_idx, slot in enumerate(layer.seed_layout.slots)
        )  # and inserted blocks (DEEPEN): an insertion or a cull changes the parameters
        return seeds + tuple(("deepen", b.block_id, None) for b in self.model.inserted_blocks)

    # -- telemetry and DDP ---------------------------------------------------------------------

    def collect_telemetry(self) -> list[HealthSignal]:
        """Health signals from accumulators averaged across ranks (identical on every rank).

        A non-finite kernel output on any rank makes the average non-finite, so the seed is
        quarantined everywhere.
        """

        def mean_across_ranks(accumulators: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(accumulators, op=dist.ReduceOp.SUM, group=self.group)
            return accumulators / self.world_size

        return self.model.collect_telemetry(reduce=mean_across_ranks)

    def replicas_identical(self) -> bool:
        """Whether every rank holds bit-identical parameters, buffers and seed states (a
        checksum per tensor, compared with two all-reduces; for end-of-run checks). Health
        accumulators are left out: they hold each rank's own data until they are read."""
        state = self.model.state_dict()
        digest = torch.tensor(
            [
                float(t.double().sum())
                for name, t in state.items()
                if isinstance(t, torch.Tensor)  # not extra state (the deepen log)
                and t.numel()
                and not name.endswith(_RANK_LOCAL_BUFFERS)
            ]
            + [float(int(s)) for layer in self._layers() for s in layer.seed_states],
            dtype=torch.float64,
            device=self._device,
        )
        low, high = digest.clone(), digest.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=self.group)
        return bool(torch.equal(low, high))

    def ddp(self, **ddp_options: Any) -> DistributedDataParallel:
        """A fresh DDP wrapper over the model's current parameters (call after a structural
        change; drop the previous wrapper first so its gradient hooks go with it)."""
        return DistributedDataParallel(self.model, process_group=self.group, **ddp_options)
