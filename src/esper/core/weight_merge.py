"""Exact merges: kept kernels folded into their host layer's own weights.

A kernel that is a linear map over channels (``k(u) = M u + c``: a ``lowrank_adapter`` with the
identity activation, a pointwise ``conv_adapter`` with the identity activation) composes exactly
with the host wherever the host is linear in the tensor the kernel reads:

* Linear, kernel reading its input ``x``: ``W x + b + Σ α (M x + c)`` is the Linear with
  ``W + Σ α M`` and ``b + Σ α c``;
* Conv1d/Conv2d (``groups=1``) or MultiheadAttention, kernel reading the output ``h``:
  ``h + Σ α (M h + c) = T h + Σ α c`` with ``T = I + Σ α M``; ``h`` is the convolution's (or
  ``out_proj``'s) affine output, so the merged weights are ``T W`` and ``T b + Σ α c``.

Merged weights are computed in float64 and rounded once to the layer's dtype: outputs equal the
grafted model's up to float rounding. A merged layer is its original class with its original
parameters, so PyTorch's fused inference paths keep working on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from esper.execution.layer_kinds import GraftPoint, LayerProfile

ChannelMap = tuple[torch.Tensor, torch.Tensor | None]
"""``(M, c)``: a kernel as a linear map over channels, ``M`` (C_out, C_in), ``c`` (C_out,)."""


def channel_map(kernel: nn.Module) -> ChannelMap | None:
    """The kernel as ``(M, c)`` if it is a linear map over channels, else ``None``."""
    equivalent = getattr(kernel, "linear_equivalent", None)
    result = equivalent() if callable(equivalent) else None
    return result if isinstance(result, tuple) else None


def merge_kernels(
    base: nn.Module, profile: LayerProfile, kernels: Sequence[nn.Module], alphas: Sequence[float]
) -> bool:
    """Fold every kernel into ``base``'s weights if that is exact; return whether it was done
    (``base`` is left unchanged when it is not)."""
    maps = [channel_map(kernel) for kernel in kernels]
    if any(m is None for m in maps):
        return False
    exact_maps = [m for m in maps if m is not None]
    if isinstance(base, nn.MultiheadAttention):
        _merge_after(base.out_proj, exact_maps, alphas)
        return True
    if profile.graft_point is GraftPoint.INPUT and isinstance(base, nn.Linear):
        _merge_beside(base, exact_maps, alphas)
        return True
    if isinstance(base, nn.Conv1d | nn.Conv2d) and base.groups == 1:
        _merge_after(base, exact_maps, alphas)
        return True
    return False


def _set_bias(layer: nn.Linear | nn.Conv1d | nn.Conv2d, bias: torch.Tensor | None) -> None:
    if bias is None:
        return
    dtype = layer.weight.dtype
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.to(dtype), requires_grad=layer.weight.requires_grad)
    else:
        layer.bias.copy_(bias)


@torch.no_grad()
def _merge_beside(base: nn.Linear, maps: Sequence[ChannelMap], alphas: Sequence[float]) -> None:
    """Kernels reading the Linear's input: ``W + Σ α M``, ``b + Σ α c``."""
    weight = base.weight.double()
    bias = base.bias.double() if base.bias is not None else None
    for alpha, (m, c) in zip(alphas, maps, strict=True):
        weight = weight + alpha * m.double()
        if c is not None:
            bias = (
                bias if bias is not None else torch.zeros_like(weight[:, 0])
            ) + alpha * c.double()
    base.weight.copy_(weight)
    _set_bias(base, bias)


@torch.no_grad()
def _merge_after(
    layer: nn.Linear | nn.Conv1d | nn.Conv2d, maps: Sequence[ChannelMap], alphas: Sequence[float]
) -> None:
    """Kernels reading the layer's output: ``T W`` and ``T b + Σ α c``, ``T = I + Σ α M``."""
    weight = layer.weight.double()  # (C, C_in, *k) or (C, C_in)
    channels = weight.shape[0]
    transform = torch.eye(channels, dtype=torch.float64, device=weight.device)  # (C, C)
    shift: torch.Tensor | None = None
    for alpha, (m, c) in zip(alphas, maps, strict=True):
        transform = transform + alpha * m.double()
        if c is not None:
            shift = (
                shift if shift is not None else torch.zeros_like(transform[0])
            ) + alpha * c.double()
    merged = (transform @ weight.flatten(1)).reshape(weight.shape)  # (C, C_in, *k)
    bias = transform @ layer.bias.double() if layer.bias is not None else None  # (C,)
    if shift is not None:
        bias = shift if bias is None else bias + shift
    layer.weight.copy_(merged)
    _set_bias(layer, bias)
