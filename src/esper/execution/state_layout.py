"""Seed state layout: structure-of-arrays buffers for one layer's seeds, plus their host mirror.

Every per-seed field is one registered buffer indexed by seed (so it moves with ``.to()`` and is
saved in ``state_dict``). The host keeps a mirror of the fields that drive control flow (state,
alpha, kernel id, error count, retry step) so the training loop never reads the device to decide
anything. The host is the source of truth; each change writes through to the device buffer
without a sync, and :meth:`SeedStateLayout.reload_from_buffers` rebuilds the mirror after a
checkpoint load. Transitions are validated against :data:`esper.contracts.TRANSITIONS` before
anything changes.

Dtypes: ``alpha`` follows the model (a float64 model blends in float64 and ``model.half()``
makes it float16); the health accumulators follow it too but never go below float32, so sums of
ordinary float16 activations cannot overflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from esper.contracts import SeedState, check_transition

SEED_LAYOUT_KEY = "seed_state"
"""Name a layer registers its :class:`SeedStateLayout` under, so its buffers' state-dict keys are
``<layer>.seed_state.<buffer>``. The layer exposes it as ``layer.seed_layout``; the key keeps
the name checkpoints have always used, so every saved checkpoint still loads."""

KERNEL_ID_BYTES = 32
"""A kernel id (sha256 hex) is stored on the device as its 32 raw bytes."""

LAYER_HEALTH_FIELDS = ("samples", "mean_sum", "sq_mean_sum", "dead_fraction_sum")
"""Columns of ``layer_health``: recorded forwards and running sums of per-forward statistics."""

SEED_HEALTH_FIELDS = ("contribution_sq_sum", "recorded_forwards", "output_sum")
"""Columns of ``seed_health``: per-seed running sums. ``output_sum`` adds up every forward's
kernel output sum: it stays finite exactly when every output in the window was finite."""


@dataclass
class SeedSlot:
    """Host-side mirror of one seed."""

    state: SeedState = SeedState.DORMANT
    alpha: float = 0.0
    kernel_id: str | None = None
    error_count: int = 0
    retry_after_step: int = 0
    blend_steps_done: int = 0


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype health statistics accumulate in for a model in ``dtype``: float32 or wider."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class SeedStateLayout(nn.Module):
    """Per-layer seed state as device buffers (structure of arrays) with a host mirror.

    Args:
        num_seeds: seeds in the layer.
        dtype: the model's floating dtype (that of ``alpha``; accumulators are at least float32).

    Buffers (``N = num_seeds``): ``lifecycle`` int8 (N,), ``alpha`` dtype (N,), ``kernel_id``
    uint8 (N, 32), ``error_count`` int32 (N,), ``retry_after_step`` int64 (N,), ``blend_steps``
    int32 (N,), ``layer_health`` accumulator (4,), ``seed_health`` accumulator (N, 3).
    """

    lifecycle: torch.Tensor
    alpha: torch.Tensor
    kernel_id: torch.Tensor
    error_count: torch.Tensor
    retry_after_step: torch.Tensor
    blend_steps: torch.Tensor
    layer_health: torch.Tensor
    seed_health: torch.Tensor

    def __init__(self, num_seeds: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        n = num_seeds
        accumulator = accumulator_dtype(dtype)
        self.register_buffer("lifecycle", torch.zeros(n, dtype=torch.int8))
        self.register_buffer("alpha", torch.zeros(n, dtype=dtype))
        self.register_buffer("kernel_id", torch.zeros(n, KERNEL_ID_BYTES, dtype=torch.uint8))
        self.register_buffer("error_count", torch.zeros(n, dtype=torch.int32))
        self.register_buffer("retry_after_step", torch.zeros(n, dtype=torch.int64))
        self.register_buffer("blend_steps", torch.zeros(n, dtype=torch.int32))
        self.register_buffer(
            "layer_health", torch.zeros(len(LAYER_HEALTH_FIELDS), dtype=accumulator)
        )
        self.register_buffer(
            "seed_health", torch.zeros(n, len(SEED_HEALTH_FIELDS), dtype=accumulator)
        )
        self.slots = [SeedSlot() for _ in range(n)]
        self.running: tuple[int, ...] = ()
        """Indices of seeds whose kernels run in forward (BLENDING, ACTIVE, FOSSILIZED)."""

    def _apply(self, fn: Any, recurse: bool = True) -> SeedStateLayout:
        """``.half()``/``.to(dtype)``: alpha follows; the accumulators stay float32 or wider."""
        super()._apply(fn, recurse)
        for name in ("layer_health", "seed_health"):
            buffer = self._buffers[name]
            assert buffer is not None
            if buffer.dtype != accumulator_dtype(buffer.dtype):
                self._buffers[name] = buffer.to(accumulator_dtype(buffer.dtype))
        return self

    @property
    def num_seeds(self) -> int:
        """Number of seeds in the layer."""
        return len(self.slots)

    def transition(self, seed_idx: int, dst: SeedState, *, where: str) -> None:
        """Move a seed to ``dst`` after checking the transition table; illegal moves change nothing."""
        slot = self.slots[seed_idx]
        check_transition(slot.state, dst, where=where)
        slot.state = dst
        self.lifecycle[seed_idx].fill_(int(dst))
        self.running = tuple(i for i, s in enumerate(self.slots) if s.state.runs_kernel)

    def set_alpha(self, seed_idx: int, value: float) -> None:
        """Set a seed's blend weight (host mirror and device buffer)."""
        self.slots[seed_idx].alpha = value
        self.alpha[seed_idx].fill_(value)

    def set_blend_steps(self, seed_idx: int, steps_done: int) -> None:
        """Record how many blending steps a seed has completed."""
        self.slots[seed_idx].blend_steps_done = steps_done
        self.blend_steps[seed_idx].fill_(steps_done)

    def set_kernel_id(self, seed_idx: int, kernel_id: str | None) -> None:
        """Record which kernel a seed holds (``None``: none)."""
        self.slots[seed_idx].kernel_id = kernel_id
        raw = bytes.fromhex(kernel_id) if kernel_id else bytes(KERNEL_ID_BYTES)
        self.kernel_id[seed_idx].copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))

    def set_errors(self, seed_idx: int, *, error_count: int, retry_after_step: int) -> None:
        """Record a seed's fault count and the step before which it is not retried."""
        slot = self.slots[seed_idx]
        slot.error_count = error_count
        slot.retry_after_step = retry_after_step
        self.error_count[seed_idx].fill_(error_count)
        self.retry_after_step[seed_idx].fill_(retry_after_step)

    def reset_health(self) -> None:
        """Zero the health accumulators (after they were read)."""
        self.layer_health.zero_()
        self.seed_health.zero_()

    def reload_from_buffers(self) -> None:
        """Rebuild the host mirror from the device buffers (one transfer; after a checkpoint load)."""
        lifecycle = self.lifecycle.tolist()
        alpha = self.alpha.tolist()
        kernel_ids = self.kernel_id.cpu().numpy()
        errors = self.error_count.tolist()
        retry = self.retry_after_step.tolist()
        blend = self.blend_steps.tolist()
        for i, slot in enumerate(self.slots):
            raw = bytes(kernel_ids[i])
            slot.state = SeedState(lifecycle[i])
            slot.alpha = float(alpha[i])
            slot.kernel_id = raw.hex() if any(raw) else None
            slot.error_count = int(errors[i])
            slot.retry_after_step = int(retry[i])
            slot.blend_steps_done = int(blend[i])
        self.running = tuple(i for i, s in enumerate(self.slots) if s.state.runs_kernel)

    def extra_repr(self) -> str:
        return "states=[" + ", ".join(s.state.name for s in self.slots) + "]"


KasminaStateLayout = SeedStateLayout
"""The reference design's name of :class:`SeedStateLayout` (same class)."""

SeedLifecycleState = SeedState
"""The reference design's name of :class:`esper.contracts.SeedState` (same enum)."""
