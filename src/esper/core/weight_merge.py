"""Exact merges: kept kernels folded into their host layer's own weights.

A kernel that is a linear map over channels (``k(u) = M u + c``: a ``lowrank_adapter`` with the
identity activation, a pointwise ``conv_adapter`` with the identity activation) composes exactly
with the host wherever the host is linear in the tensor the kernel reads. Each layer kind names
its rule (``merge=`` of :func:`~esper.execution.register_layer_kind`, one of ``MERGE_RULES``):

* ``linear_input`` (Linear), kernel reading its input ``x``: ``W x + b + Σ α (M x + c)`` is the
  Linear with ``W + Σ α M`` and ``b + Σ α c``;
* ``transposed_linear_input`` (GPT-2's Conv1D, ``y = x W + b`` with ``W`` stored ``(in, out)``):
  the same with ``W + Σ α Mᵀ``;
* ``affine_output`` (Conv1d/Conv2d with ``groups=1``) and ``attention_output``
  (MultiheadAttention), kernel reading the output ``h``: ``h + Σ α (M h + c) = T h + Σ α c``
  with ``T = I + Σ α M``; ``h`` is the convolution's (or ``out_proj``'s) affine output, so the
  merged weights are ``T W`` and ``T b + Σ α c``;
* ``embedding_output`` (Embedding without ``max_norm``), kernel reading the looked-up rows
  ``e = E[i]``: ``T e + Σ α c`` is the row ``i`` of the table ``E Tᵀ + Σ α c``.

A layer whose parameters another module shares (GPT-2's ``lm_head`` tied to ``wte``) is never
merged: the other module would change too. :func:`esper.core.unwrap.unwrap_model` checks that.

Merged weights are computed in float64 and rounded once to the layer's dtype: outputs equal the
grafted model's up to float rounding. A merged layer is its original class with its original
parameters, so PyTorch's fused inference paths keep working on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from esper.execution.layer_kind_registry import MERGE_RULES
from esper.execution.layer_kinds import LayerProfile

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
    rule = _RULES.get(profile.merge) if profile.merge is not None else None
    maps = [channel_map(kernel) for kernel in kernels]
    if rule is None or any(m is None for m in maps):
        return False
    return rule(base, [m for m in maps if m is not None], alphas)


def _linear_input(base: nn.Module, maps: Sequence[ChannelMap], alphas: Sequence[float]) -> bool:
    if not isinstance(base, nn.Linear):
        return False
    _merge_beside(base, base.weight, maps, alphas)
    return True


def _transposed_linear_input(
    base: nn.Module, maps: Sequence[ChannelMap], alphas: Sequence[float]
) -> bool:
    """GPT-2's Conv1D: merge into ``weight.T``, a view, so the stored ``(in, out)`` changes."""
    weight = base._parameters.get("weight")
    if weight is None or weight.dim() != 2:
        return False
    _merge_beside(base, weight.T, maps, alphas)  # (out, in)
    return True


def _affine_output(base: nn.Module, maps: Sequence[ChannelMap], alphas: Sequence[float]) -> bool:
    if not isinstance(base, nn.Conv1d | nn.Conv2d) or base.groups != 1:
        return False  # a grouped convolution's channels do not mix: T W would not be grouped
    _merge_after(base, maps, alphas)
    return True


def _attention_output(base: nn.Module, maps: Sequence[ChannelMap], alphas: Sequence[float]) -> bool:
    if not isinstance(base, nn.MultiheadAttention):
        return False
    _merge_after(base.out_proj, maps, alphas)
    return True


@torch.no_grad()
def _embedding_output(base: nn.Module, maps: Sequence[ChannelMap], alphas: Sequence[float]) -> bool:
    """``E Tᵀ + Σ α c``; not with ``max_norm`` (rows are renormalised at lookup, before ``T``)."""
    if not isinstance(base, nn.Embedding) or base.max_norm is not None:
        return False
    table = base.weight.double()  # (V, D)
    transform = torch.eye(table.shape[1], dtype=torch.float64, device=table.device)  # (D, D)
    shift = torch.zeros_like(table[0])  # (D,)
    for alpha, (m, c) in zip(alphas, maps, strict=True):
        transform = transform + alpha * m.double()
        if c is not None:
            shift = shift + alpha * c.double()
    base.weight.copy_(table @ transform.T + shift)  # (V, D)
    return True


_RULES: dict[str, Callable[[nn.Module, Sequence[ChannelMap], Sequence[float]], bool]] = {
    "linear_input": _linear_input,
    "transposed_linear_input": _transposed_linear_input,
    "affine_output": _affine_output,
    "attention_output": _attention_output,
    "embedding_output": _embedding_output,
}
assert set(_RULES) == set(MERGE_RULES), "every merge rule a kind may name is implemented here"


def _set_bias(layer: nn.Module, bias: torch.Tensor | None) -> None:
    if bias is None:
        return
    weight = layer.get_parameter("weight")
    current = layer._parameters.get("bias")
    if current is None:
        layer.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=weight.requires_grad)
    else:
        current.copy_(bias)


@torch.no_grad()
def _merge_beside(
    base: nn.Module, out_in: torch.Tensor, maps: Sequence[ChannelMap], alphas: Sequence[float]
) -> None:
    """Kernels reading the input of ``base`` (``x @ out_in.T + bias``): ``W + Σ α M``,
    ``b + Σ α c``; ``out_in`` is ``base``'s weight as ``(out, in)`` (a view is written through)."""
    weight = out_in.double()
    current_bias = base._parameters.get("bias")
    bias = current_bias.double() if current_bias is not None else None
    for alpha, (m, c) in zip(alphas, maps, strict=True):
        weight = weight + alpha * m.double()
        if c is not None:
            bias = (
                bias if bias is not None else torch.zeros_like(weight[:, 0])
            ) + alpha * c.double()
    out_in.copy_(weight)
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
