"""Merging a widen on fossilize: the wrapped modules become plain, wider torch modules.

:func:`merge_widened` turns each wrapper of :mod:`esper.operators.widen_modules` (at α = 1)
into the module of its final shape -- ``nn.Linear``/``nn.Conv*`` with ``n + k`` outputs,
``nn.BatchNorm*``/``nn.LayerNorm`` over ``n + k``, and the consumer with ``n + k`` inputs -- whose
parameters are the host's and the new units' concatenated. It also says, for every parameter
that changed, which old parameters fill which region, so the optimizer state can follow
(:mod:`esper.operators.optimizer_surgery`). The consumer's bias is reused as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from esper.operators.optimizer_surgery import StatePiece
from esper.operators.widen_init import weight_of
from esper.operators.widen_modules import (
    WidenedBatchNorm,
    WidenedConsumer,
    WidenedLayerNorm,
    WidenedProducer,
)


@dataclass(frozen=True)
class ParameterChange:
    """``new`` replaces ``old``; its regions come from ``pieces``."""

    old: nn.Parameter
    new: nn.Parameter
    pieces: tuple[StatePiece, ...]


@dataclass(frozen=True)
class MergedModule:
    """A plain module replacing a wrapper, and the parameters that changed on the way."""

    module: nn.Module
    changes: tuple[ParameterChange, ...]


def merge_widened(wrapper: nn.Module) -> MergedModule:
    """The plain module computing what ``wrapper`` computes at α = 1."""
    with torch.no_grad():
        if isinstance(wrapper, WidenedProducer):
            return _merge_producer(wrapper)
        if isinstance(wrapper, WidenedBatchNorm):
            return _merge_batch_norm(wrapper)
        if isinstance(wrapper, WidenedLayerNorm):
            return _merge_layer_norm(wrapper)
        if isinstance(wrapper, WidenedConsumer):
            return _merge_consumer(wrapper)
    raise TypeError(f"not a widening wrapper: {type(wrapper).__name__}")


def _merge_producer(wrapper: WidenedProducer) -> MergedModule:
    host = wrapper.host
    total = weight_of(host).shape[0] + wrapper.weight.shape[0]
    options = {"device": "meta", "bias": host.bias is not None}
    if isinstance(host, nn.Linear):
        plain: nn.Module = nn.Linear(host.in_features, total, **options)  # type: ignore[arg-type]
    else:
        assert isinstance(host, nn.Conv1d | nn.Conv2d)
        plain = type(host)(
            host.in_channels,
            total,
            host.kernel_size,  # type: ignore[arg-type]
            stride=host.stride,  # type: ignore[arg-type]
            padding=host.padding,  # type: ignore[arg-type]
            dilation=host.dilation,  # type: ignore[arg-type]
            **options,  # type: ignore[arg-type]
        )
    changes = [_concat(plain, "weight", host.weight, wrapper.weight, dim=0)]
    if host.bias is not None and wrapper.bias is not None:
        changes.append(_concat(plain, "bias", host.bias, wrapper.bias, dim=0))
    return MergedModule(plain.train(host.training), tuple(changes))


def _merge_batch_norm(wrapper: WidenedBatchNorm) -> MergedModule:
    host = wrapper.host
    total = host.num_features + wrapper.k
    plain = type(host)(
        total,
        eps=host.eps,
        momentum=host.momentum,
        affine=host.affine,
        track_running_stats=host.track_running_stats,
        device="meta",
    )
    changes = []
    if host.affine and wrapper.weight is not None and wrapper.bias is not None:
        changes.append(_concat(plain, "weight", host.weight, wrapper.weight, dim=0))
        changes.append(_concat(plain, "bias", host.bias, wrapper.bias, dim=0))
    if host.running_mean is not None and wrapper.running_mean is not None:
        plain.running_mean = torch.cat([host.running_mean, wrapper.running_mean])
        plain.running_var = torch.cat([host.running_var, wrapper.running_var])  # type: ignore[list-item]
        plain.num_batches_tracked = host.num_batches_tracked.clone()  # type: ignore[union-attr]
    return MergedModule(plain.train(host.training), tuple(changes))


def _merge_layer_norm(wrapper: WidenedLayerNorm) -> MergedModule:
    host = wrapper.host
    total = host.normalized_shape[0] + wrapper.k
    plain = nn.LayerNorm(
        total,
        eps=host.eps,
        elementwise_affine=host.elementwise_affine,
        bias=host.bias is not None,
        device="meta",
    )
    changes = []
    if host.weight is not None and wrapper.weight is not None:
        changes.append(_concat(plain, "weight", host.weight, wrapper.weight, dim=0))
    if host.bias is not None and wrapper.bias is not None:
        changes.append(_concat(plain, "bias", host.bias, wrapper.bias, dim=0))
    return MergedModule(plain.train(host.training), tuple(changes))


def _merge_consumer(wrapper: WidenedConsumer) -> MergedModule:
    host = wrapper.host
    total = weight_of(host).shape[1] + wrapper.weight.shape[1]
    options = {"device": "meta", "bias": host.bias is not None}
    if isinstance(host, nn.Linear):
        plain: nn.Module = nn.Linear(total, host.out_features, **options)  # type: ignore[arg-type]
    else:
        assert isinstance(host, nn.Conv1d | nn.Conv2d)
        plain = type(host)(
            total,
            host.out_channels,
            host.kernel_size,  # type: ignore[arg-type]
            stride=host.stride,  # type: ignore[arg-type]
            padding=host.padding,  # type: ignore[arg-type]
            dilation=host.dilation,  # type: ignore[arg-type]
            **options,  # type: ignore[arg-type]
        )
    fan_out = nn.Parameter(wrapper.weight * wrapper.alpha)
    change = _concat(plain, "weight", host.weight, fan_out, dim=1)
    change = ParameterChange(
        change.old,
        change.new,
        (change.pieces[0], StatePiece(wrapper.weight, change.pieces[1].region)),
    )
    if host.bias is not None:
        plain.bias = host.bias
    return MergedModule(plain.train(host.training), (change,))


def _concat(
    plain: nn.Module, name: str, old: torch.Tensor, new: torch.Tensor, *, dim: int
) -> ParameterChange:
    """Set ``plain.<name>`` to ``cat(old, new, dim)``; the change, old parameter first."""
    assert isinstance(old, nn.Parameter) and isinstance(new, nn.Parameter)
    merged = nn.Parameter(torch.cat([old.detach(), new.detach()], dim=dim), old.requires_grad)
    setattr(plain, name, merged)
    lead = (slice(None),) * (dim % old.dim())
    n = old.shape[dim]
    pieces = (
        StatePiece(old, (*lead, slice(0, n))),
        StatePiece(new, (*lead, slice(n, merged.shape[dim]))),
    )
    return ParameterChange(old, merged, pieces)
