"""Optimizer surgery: a parameter replaced by a wider one keeps its optimizer state.

When a widen is merged, the host's ``weight`` ``(n, in)`` becomes a new parameter ``(n + k,
in)``. :func:`replace_parameter` puts the new parameter where the old one was in its group and
builds its per-parameter state from pieces: every state tensor of the parameter's shape (Adam's
and AdamW's ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``, SGD's ``momentum_buffer``) is zero,
with the old parameter's state copied into the old slice and, for the new slice, the state the
new units gathered while they blended in (if any). Scalars (Adam's ``step``) are the old
parameter's: the host's schedule goes on.

Adam's moments are bias-corrected by ``1 - β^step``; the new units' moments were gathered over
fewer steps than the host's, so they are rescaled by ``(1 - β^step_host) / (1 - β^step_units)``
so that the update they give under the host's step count is the one they would have given under
their own. Without it, a ``v`` gathered over 20 steps read under a step count of 1000 is ~50×
too small and the new units' first merged steps are ~7× too large.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

ADAM_MOMENTS = {"exp_avg": 0, "exp_avg_sq": 1, "max_exp_avg_sq": 1}
"""Adam state keys and the index of the β that bias-corrects each."""


@dataclass(frozen=True)
class StatePiece:
    """Where the state of one source parameter goes inside the new parameter.

    Attributes:
        source: the parameter whose state fills ``region``.
        region: the index of that region in the new parameter (``(slice(0, n),)``).
    """

    source: nn.Parameter
    region: tuple[slice, ...]


def replace_parameter(
    optimizer: torch.optim.Optimizer,
    old: nn.Parameter,
    new: nn.Parameter,
    pieces: Sequence[StatePiece],
) -> None:
    """Put ``new`` in place of ``old`` in ``optimizer``, its state assembled from ``pieces``.

    Regions not covered by a piece, or whose source has no state, start at zero. The sources'
    own state is left in place (the caller drops the group that held them). Nothing happens if
    the optimizer does not hold ``old``.
    """
    group = next((g for g in optimizer.param_groups if any(p is old for p in g["params"])), None)
    if group is None:
        return
    index = next(i for i, p in enumerate(group["params"]) if p is old)
    group["params"][index] = new
    old_state = optimizer.state.pop(old, None)
    if not old_state:
        return
    host_step = _step(old_state)
    optimizer.state[new] = {
        key: _assembled(optimizer, key, value, old, new, pieces, group, host_step)
        if isinstance(value, torch.Tensor) and value.shape == old.shape and old.dim() > 0
        else value
        for key, value in old_state.items()
    }


def _assembled(
    optimizer: torch.optim.Optimizer,
    key: str,
    old_value: torch.Tensor,
    old: nn.Parameter,
    new: nn.Parameter,
    pieces: Sequence[StatePiece],
    group: dict[str, Any],
    host_step: float | None,
) -> torch.Tensor:
    value = torch.zeros(new.shape, dtype=old_value.dtype, device=old_value.device)
    for piece in pieces:
        state = {key: old_value} if piece.source is old else optimizer.state.get(piece.source, {})
        source_value = state.get(key)
        if not isinstance(source_value, torch.Tensor):
            continue
        if source_value.shape != value[piece.region].shape:
            raise ValueError(
                f"optimizer state {key!r} of shape {tuple(source_value.shape)} does not fit "
                f"region {piece.region} of a parameter of shape {tuple(new.shape)}"
            )
        if piece.source is not old:
            source_step = _step(optimizer.state.get(piece.source, {}))
            source_value = source_value * _bias_rescale(key, group, host_step, source_step)
        value[piece.region] = source_value
    return value


def _bias_rescale(
    key: str, group: dict[str, Any], host_step: float | None, source_step: float | None
) -> float:
    """``(1 - β^t_host) / (1 - β^t_source)`` for Adam moments, else 1."""
    betas = group.get("betas")
    if key not in ADAM_MOMENTS or betas is None:
        return 1.0
    if not host_step or not source_step or host_step == source_step:
        return 1.0
    beta = float(betas[ADAM_MOMENTS[key]])
    return (1.0 - beta**host_step) / (1.0 - beta**source_step)


def _step(state: dict[str, Any]) -> float | None:
    step = state.get("step")
    if isinstance(step, torch.Tensor):
        return float(step.item())
    return float(step) if step is not None else None
