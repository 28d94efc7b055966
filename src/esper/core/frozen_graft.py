"""Frozen grafts: what a seeded layer becomes when a model is unwrapped into a plain model.

A layer without running kernels becomes its base module again. A Linear layer whose running
kernels are all linear maps gets them merged into its weights (``W + Σ α·ΔW``). Any other layer
becomes a :class:`FrozenGraft`: the base module plus its kernels at fixed alphas, with none of the
lifecycle machinery.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from esper.execution import KasminaLayer
from esper.execution.layer_kinds import GraftPoint


class FrozenGraft(nn.Module):
    """``base(x) + Σ alpha_i · kernel_i(u)`` with constant alphas (``u``: input or output).

    Args:
        base: the host module.
        kernels: the kept kernel modules.
        alphas: their blend weights.
        reads_input: whether kernels read the layer input (else the base output).
        returns_tuple: whether the base returns ``(output, *extras)``.
    """

    alphas: torch.Tensor

    def __init__(
        self,
        base: nn.Module,
        kernels: list[nn.Module],
        alphas: list[float],
        *,
        reads_input: bool,
        returns_tuple: bool,
    ) -> None:
        super().__init__()
        self.base = base
        self.kernels = nn.ModuleList(kernels)
        self.register_buffer("alphas", torch.tensor(alphas, dtype=torch.float32))
        self.reads_input = reads_input
        self.returns_tuple = returns_tuple

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Base output plus the fixed-alpha kernel contributions."""
        out = self.base(*args, **kwargs)
        y = out[0] if self.returns_tuple else out
        kernel_in = (args[0] if args else next(iter(kwargs.values()))) if self.reads_input else y
        for alpha, kernel in zip(self.alphas, self.kernels, strict=True):
            y = torch.addcmul(y, kernel(kernel_in), alpha.to(y.dtype))
        return (y, *out[1:]) if self.returns_tuple else y


def _merge_linear(
    base: nn.Linear, kernels: list[nn.Module], alphas: list[float]
) -> nn.Linear | None:
    """``base`` with linear kernels folded into its weights, or ``None`` if one is not linear."""
    deltas = []
    for kernel in kernels:
        equivalent = getattr(kernel, "linear_equivalent", None)
        delta = equivalent() if callable(equivalent) else None
        if delta is None:
            return None
        deltas.append(delta)
    with torch.no_grad():
        for alpha, (weight, bias) in zip(alphas, deltas, strict=True):
            base.weight.add_(weight.to(base.weight.dtype), alpha=alpha)
            if bias is None:
                continue
            if base.bias is None:
                base.bias = nn.Parameter(torch.zeros_like(base.weight[:, 0]))
            base.bias.add_(bias.to(base.bias.dtype), alpha=alpha)
    return base


def freeze_layer(layer: KasminaLayer) -> nn.Module:
    """The plain module equivalent to ``layer`` in its current state (modifies ``layer.base``)."""
    running = layer.seed_state.running
    if not running:
        return layer.base
    kernels = [module for i in running if (module := layer.kernel(i)) is not None]
    alphas = [layer.seed_state.slots[i].alpha for i in running]
    reads_input = layer.profile.graft_point is GraftPoint.INPUT
    if isinstance(layer.base, nn.Linear) and reads_input:
        merged = _merge_linear(layer.base, kernels, alphas)
        if merged is not None:
            return merged
    return FrozenGraft(
        layer.base,
        kernels,
        alphas,
        reads_input=reads_input,
        returns_tuple=layer.profile.returns_tuple,
    )
