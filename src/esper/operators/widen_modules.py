"""Widening wrappers: the host modules of a widen in progress, with the new units beside them.

While a widen blends in, layer A, the norm between and consumer B are each wrapped; the host
module inside is kept as is (same object, same parameters, so the optimizer and every old weight
are untouched) and the *k* new units are separate parameters:

* :class:`WidenedProducer`: ``h = cat(A(x), A_new(x))`` along the feature/channel dim;
* :class:`WidenedBatchNorm`: one batch norm over all channels, with the host's and the new
  channels' affine parameters and running statistics concatenated (BatchNorm keeps channels
  apart, so the old channels get exactly what the host gives them);
* :class:`WidenedLayerNorm`: ``(1-α)·LN_n(h_old) ⊕ LN_{n+k}(h)``, the old features blending from
  their own statistics (exact at α = 0) to those of all ``n + k`` (plain LayerNorm at α = 1);
* :class:`WidenedConsumer`: ``y = B(h_old) + α · B_new(h_new)``.

At α = 0 the host's output is therefore bit-identical (``B(h_old) + 0``, and every old feature
computed by the host module on the same values); at α = 1 the wrappers compute exactly what the
plain wider modules built by :mod:`esper.operators.widen_merge` compute. α is a 0-dim device
buffer, so ramping it never recompiles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def feature_dim(module: nn.Module) -> int:
    """The dim of a layer's input/output that widening grows: channels (1) for conv/BatchNorm
    inputs, the last dim for Linear/LayerNorm."""
    return 1 if isinstance(module, nn.Conv1d | nn.Conv2d | nn.BatchNorm1d | nn.BatchNorm2d) else -1


class WidenedProducer(nn.Module):
    """Layer A with ``k`` more output units: ``cat(host(x), new(x))``.

    Args:
        host: the Linear or Conv being widened (kept as is).
        weight: the new units' fan-in, ``(k, in)`` or ``(k, in_channels, *kernel)``.
        bias: the new units' bias ``(k,)``, or ``None`` if the host has none.
    """

    def __init__(self, host: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.host = host
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self._dim = 1 if isinstance(host, nn.Conv1d | nn.Conv2d) else -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., n)`` ⊕ ``(..., k)`` -> ``(..., n + k)`` (channels for a conv)."""
        if isinstance(self.host, nn.Conv1d | nn.Conv2d):
            new = self.host._conv_forward(x, self.weight, self.bias)
        else:
            new = F.linear(x, self.weight, self.bias)
        return torch.cat([self.host(x), new], dim=self._dim)


class WidenedBatchNorm(nn.Module):
    """A BatchNorm over ``n`` channels plus ``k`` new channels with their own statistics.

    The new channels start with weight 1, bias 0, running mean 0 and variance 1, as a fresh
    BatchNorm; the host's momentum and eps apply to them too.
    """

    def __init__(self, host: nn.BatchNorm1d | nn.BatchNorm2d, k: int) -> None:
        super().__init__()
        self.host = host
        self.k = k
        like = host.running_mean if host.running_mean is not None else host.weight
        self.weight = nn.Parameter(like.new_ones(k)) if host.affine else None
        self.bias = nn.Parameter(like.new_zeros(k)) if host.affine else None
        self.running_mean: torch.Tensor | None
        self.running_var: torch.Tensor | None
        if host.track_running_stats:
            self.register_buffer("running_mean", like.new_zeros(k))
            self.register_buffer("running_var", like.new_ones(k))
        else:
            self.running_mean = self.running_var = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n + k, ...)`` -> ``(B, n + k, ...)``: one batch norm over all channels (each
        channel is normalised on its own, so the old ones compute what the host computes),
        the running statistics then written back to the host's and the new channels' buffers."""
        host = self.host
        n = host.num_features
        tracking = host.running_mean is not None and self.running_mean is not None
        mean = _cat_optional(host.running_mean, self.running_mean)
        var = _cat_optional(host.running_var, self.running_var)
        momentum = host.momentum if host.momentum is not None else 0.1
        out = F.batch_norm(
            x,
            mean,
            var,
            _cat_optional(host.weight, self.weight),
            _cat_optional(host.bias, self.bias),
            self.training or not tracking,
            momentum,
            host.eps,
        )
        if self.training and tracking:
            assert mean is not None and var is not None
            with torch.no_grad():
                host.running_mean.copy_(mean[:n])  # type: ignore[union-attr]
                host.running_var.copy_(var[:n])  # type: ignore[union-attr]
                self.running_mean.copy_(mean[n:])  # type: ignore[union-attr]
                self.running_var.copy_(var[n:])  # type: ignore[union-attr]
                host.num_batches_tracked.add_(1)  # type: ignore[union-attr]
        return out


class WidenedLayerNorm(nn.Module):
    """A LayerNorm over ``n`` features widened to ``n + k``, its statistics blended by α.

    Output: old features ``(1-α)·host(h[..., :n]) + α·LN_{n+k}(h)[..., :n]``, new features
    ``LN_{n+k}(h)[..., n:]``; the new gain starts at 1 and the new bias at 0.
    """

    alpha: torch.Tensor

    def __init__(self, host: nn.LayerNorm, k: int) -> None:
        super().__init__()
        self.host = host
        self.k = k
        like = host.weight if host.weight is not None else torch.empty(0)
        self.weight = nn.Parameter(like.new_ones(k)) if host.weight is not None else None
        self.bias = nn.Parameter(like.new_zeros(k)) if host.bias is not None else None
        self.register_buffer("alpha", like.new_zeros(()))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``(..., n + k)`` -> ``(..., n + k)``."""
        n = self.host.normalized_shape[0]
        old = self.host(h[..., :n].contiguous())
        weight = _cat_optional(self.host.weight, self.weight)
        bias = _cat_optional(self.host.bias, self.bias)
        full = F.layer_norm(h, (h.shape[-1],), weight, bias, self.host.eps)
        blended = (1 - self.alpha) * old + self.alpha * full[..., :n]
        return torch.cat([blended, full[..., n:]], dim=-1)


class WidenedConsumer(nn.Module):
    """Layer B reading ``k`` more input units: ``host(h[:n]) + α · new(h[n:])``.

    Args:
        host: the Linear or Conv consuming the widened layer (kept as is).
        weight: the new units' fan-out, ``(out, k)`` or ``(out_channels, k, *kernel)``.
    """

    alpha: torch.Tensor

    def __init__(self, host: nn.Module, weight: torch.Tensor) -> None:
        super().__init__()
        self.host = host
        self.weight = nn.Parameter(weight)
        self.register_buffer("alpha", torch.zeros((), dtype=weight.dtype, device=weight.device))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``(..., n + k)`` -> the host's output shape."""
        if isinstance(self.host, nn.Conv1d | nn.Conv2d):
            n = self.host.in_channels
            old = self.host(h[:, :n].contiguous())
            new = self.host._conv_forward(h[:, n:], self.weight, None)
        else:
            assert isinstance(self.host, nn.Linear)
            n = self.host.in_features
            old = self.host(h[..., :n].contiguous())
            new = F.linear(h[..., n:], self.weight)
        return old + self.alpha * new


def _cat_optional(old: torch.Tensor | None, new: torch.Tensor | None) -> torch.Tensor | None:
    return torch.cat([old, new]) if old is not None and new is not None else None
