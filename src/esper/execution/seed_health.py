"""Layer health: the statistics a seeded layer accumulates on the device and the signal built
from them when telemetry is read (one transfer for the whole model).

Accumulators are at least float32 (float64 in a float64 model) whatever the model's dtype, so a
sum of ordinary float16 activations never overflows; see :func:`accumulator_dtype`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import nn

from esper.contracts import HealthSignal, SeedHealth, SeedState
from esper.execution.fast_paths import flatten_units
from esper.execution.state_layout import (
    LAYER_HEALTH_FIELDS,
    SEED_HEALTH_FIELDS,
    SeedSlot,
    SeedStateLayout,
)


def record_output_health(
    layer_health: torch.Tensor, base_out: torch.Tensor, channel_dim: int
) -> None:
    """Add one forward's output statistics (mean, mean square, dead-unit fraction) to
    ``layer_health``, computed in the accumulator's dtype; ``base_out`` may be nested."""
    units = flatten_units(base_out.detach(), channel_dim).to(layer_health.dtype)  # (M, C)
    mean = units.mean()
    sq_mean = units.square().mean()
    dead = (units > 0).any(dim=0).logical_not().to(layer_health.dtype).mean()
    layer_health.add_(torch.stack([torch.ones_like(mean), mean, sq_mean, dead]))  # (4,)


def health_tensor(base: nn.Module, layout: SeedStateLayout) -> torch.Tensor:
    """A layer's accumulators and its base grad norm as one flat device tensor.

    Layout: ``layer_health`` (4), ``seed_health`` (N*3), grad norm (1; -1 when no grads).
    """
    grads = [p.grad.detach() for p in base.parameters() if p.grad is not None]
    return torch.cat(
        [layout.layer_health, layout.seed_health.reshape(-1), grad_norm(grads, layout.layer_health)]
    )


def grad_norm(grads: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The L2 norm of ``grads`` together, shape (1,), in ``like``'s dtype and device (-1: none)."""
    if not grads:
        return torch.full((1,), -1.0, dtype=like.dtype, device=like.device)
    norms = [torch.linalg.vector_norm(g, dtype=like.dtype) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1)


def health_tensor_size(num_seeds: int) -> int:
    """Length of :func:`health_tensor` for a layer with ``num_seeds`` seeds."""
    return len(LAYER_HEALTH_FIELDS) + num_seeds * len(SEED_HEALTH_FIELDS) + 1


def _seed_values(values: Sequence[float], seed_idx: int) -> Sequence[float]:
    n_fields = len(SEED_HEALTH_FIELDS)
    start = len(LAYER_HEALTH_FIELDS) + seed_idx * n_fields
    return values[start : start + n_fields]


def nonfinite_seeds(values: Sequence[float], num_seeds: int) -> list[int]:
    """Seeds whose kernel output sum in the window is not finite (their output was not)."""
    return [i for i in range(num_seeds) if not math.isfinite(_seed_values(values, i)[2])]


@functools.lru_cache(maxsize=4096)
def _idle_seed_health(
    seed_idx: int, state: SeedState, alpha: float, kernel_id: str | None, error_count: int
) -> SeedHealth:
    """The record of a seed that recorded no forward in the window (dormant ones, mostly): the
    same few values window after window, so one immutable instance serves them all."""
    return SeedHealth(
        seed_idx=seed_idx,
        state=state,
        alpha=alpha,
        kernel_id=kernel_id,
        contribution_rms=0.0,
        nonfinite_output=False,
        error_count=error_count,
    )


def build_health_signal(
    values: Sequence[float],
    slots: Sequence[SeedSlot],
    *,
    layer_name: str,
    layer_kind: str,
    step: int,
    timestamp: float,
) -> HealthSignal:
    """The :class:`HealthSignal` of one layer's slice of the health transfer."""
    samples, mean_sum, sq_mean_sum, dead_sum = values[:4]
    seeds = []
    for seed_idx, slot in enumerate(slots):
        contribution_sq, recorded, output_sum = _seed_values(values, seed_idx)
        if not recorded and output_sum == 0.0:
            seeds.append(
                _idle_seed_health(
                    seed_idx, slot.state, slot.alpha, slot.kernel_id, slot.error_count
                )
            )
            continue
        seeds.append(
            SeedHealth(
                seed_idx=seed_idx,
                state=slot.state,
                alpha=slot.alpha,
                kernel_id=slot.kernel_id,
                contribution_rms=(contribution_sq / recorded) ** 0.5 if recorded else 0.0,
                nonfinite_output=not math.isfinite(output_sum),
                error_count=slot.error_count,
            )
        )
    norm = values[-1]
    mean = mean_sum / samples if samples else 0.0
    variance = max(0.0, sq_mean_sum / samples - mean * mean) if samples else 0.0
    return HealthSignal(
        layer_name=layer_name,
        layer_kind=layer_kind,
        step=step,
        timestamp=timestamp,
        samples=int(samples),
        output_mean=mean,
        output_std=variance**0.5,
        dead_fraction=min(1.0, max(0.0, dead_sum / samples)) if samples else 0.0,
        grad_norm=norm if norm >= 0 else None,
        seeds=tuple(seeds),
    )
