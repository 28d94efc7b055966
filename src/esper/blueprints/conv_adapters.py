"""Convolutional kernel family: pointwise (1x1) and depthwise (3x3) residual adapters.

For Conv1d/Conv2d hosts the kernel reads the layer's output feature map, and for BatchNorm2d its
input; either way the tensor read has the output's shape ``(N, C, *S)`` so the adapter keeps the
spatial size (stride 1, "same" padding). The last convolution is zero-initialised: a freshly built
kernel outputs exactly zero.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from esper.blueprints.activations import ActivationName, make_activation
from esper.blueprints.registry import initialize_kernel, register_family
from esper.contracts import KernelTarget

_CONV: dict[int, type[nn.Conv1d] | type[nn.Conv2d]] = {1: nn.Conv1d, 2: nn.Conv2d}


class ConvAdapter(nn.Module):
    """``x -> project(act(mix(x)))`` over ``(N, C_in, *S)``; ``project`` (1x1) starts at zero.

    ``mix`` is a 1x1 convolution to ``hidden`` channels (pointwise mode) or a depthwise 3x3
    convolution over the ``C_in`` channels (depthwise mode).
    """

    def __init__(
        self,
        mix: nn.Module,
        activation: nn.Module,
        project: nn.Conv1d | nn.Conv2d,
    ) -> None:
        super().__init__()
        self.mix = mix
        self.act = activation
        self.project = project
        self.zero_output_()

    def zero_output_(self) -> None:
        """Zero the output projection: the kernel then outputs exactly zero (function-preserving)."""
        nn.init.zeros_(self.project.weight)
        if self.project.bias is not None:
            nn.init.zeros_(self.project.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, C_in, *S)`` to ``(N, C_out, *S)``."""
        return self.project(self.act(self.mix(x)))

    def linear_equivalent(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(weight (C_out, C_in), bias (C_out,))`` of the pointwise map over channels this module
        computes, if it is one (pointwise mode, identity activation); else ``None``.

        Used to merge a fossilized adapter into the host convolution it reads the output of.
        """
        mix = self.mix
        if not isinstance(self.act, nn.Identity) or not isinstance(mix, nn.Conv1d | nn.Conv2d):
            return None
        if mix.groups != 1 or any(k != 1 for k in mix.kernel_size):
            return None  # depthwise 3x3: mixes neighbouring positions
        project = self.project.weight.flatten(1)  # (C_out, hidden)
        weight = project @ mix.weight.flatten(1)  # (C_out, C_in)
        bias = self.project.bias
        if mix.bias is not None:
            shifted = project @ mix.bias  # (C_out,)
            bias = shifted if bias is None else shifted + bias
        return weight, bias


class ConvAdapterParams(BaseModel):
    """Hyperparameters of ``conv_adapter``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["pointwise", "depthwise"] = "pointwise"
    hidden: int = Field(default=16, ge=1, le=65536, description="pointwise mode only")
    activation: ActivationName = "relu"


class ConvAdapterFamily:
    """``conv_adapter``: a residual 1x1 or depthwise-3x3 adapter for channels-first feature maps."""

    name = "conv_adapter"
    params_model = ConvAdapterParams

    def incompatibility(self, params: BaseModel, target: KernelTarget) -> str | None:
        """Needs a channels-first target with 1 or 2 spatial dimensions."""
        if target.channel_dim != 1 or target.spatial_dims not in _CONV:
            return (
                "conv_adapter needs a channels-first feature map with 1 or 2 spatial dimensions "
                "(Conv1d, Conv2d, BatchNorm2d); use lowrank_adapter or residual_mlp for features"
            )
        return None

    def initialize(self, module: nn.Module, params: BaseModel, generator: torch.Generator) -> None:
        """Default PyTorch initialisation from ``generator``, output stage zeroed."""
        initialize_kernel(module, generator)

    def build(self, params: BaseModel, target: KernelTarget) -> nn.Module:
        """A :class:`ConvAdapter` of the requested mode and dimensionality."""
        assert isinstance(params, ConvAdapterParams)
        conv = _CONV[target.spatial_dims]
        channels_in = target.in_features
        mix: nn.Module
        if params.mode == "pointwise":
            mix = conv(channels_in, params.hidden, kernel_size=1)
            hidden = params.hidden
        else:
            mix = conv(channels_in, channels_in, kernel_size=3, padding=1, groups=channels_in)
            hidden = channels_in
        project = conv(hidden, target.out_features, kernel_size=1)
        return ConvAdapter(mix, make_activation(params.activation), project)


register_family(ConvAdapterFamily())
