"""Feature-kernel families: the low-rank adapter and the two-layer residual MLP.

Both act on the channel dimension of the tensor they read (the last dimension for Linear,
LayerNorm and attention outputs; dimension 1 for BatchNorm1d on ``(N, C, L)``) and end in a
zero-initialised projection, so a freshly built kernel outputs exactly zero and grafting it starts
as the identity of the host layer.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F

from esper.blueprints.activations import ActivationName, make_activation
from esper.blueprints.registry import initialize_kernel, register_family
from esper.contracts import KernelTarget


class ChannelMLP(nn.Module):
    """``x -> up(act(down(x)))`` applied over ``channel_dim``; ``up`` starts at zero.

    Args:
        in_features: channels read.
        hidden: width of the hidden layer (the rank, for a low-rank adapter).
        out_features: channels written.
        activation: module between the projections (``nn.Identity`` for a linear low-rank map).
        channel_dim: -1 (features last) or 1 (channels first).
        bias: whether the projections have biases.
        norm: whether to LayerNorm the input first (over the channel dimension).
    """

    def __init__(
        self,
        in_features: int,
        hidden: int,
        out_features: int,
        *,
        activation: nn.Module,
        channel_dim: int,
        bias: bool,
        norm: bool = False,
    ) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.norm = nn.LayerNorm(in_features) if norm else nn.Identity()
        self.down = nn.Linear(in_features, hidden, bias=bias)
        self.act = activation
        self.up = nn.Linear(hidden, out_features, bias=bias)
        self.zero_output_()

    def zero_output_(self) -> None:
        """Zero the output projection: the kernel then outputs exactly zero (function-preserving)."""
        nn.init.zeros_(self.up.weight)
        if self.up.bias is not None:
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``x`` of shape ``(..., C_in)`` (or ``(N, C_in, *S)``) to the same layout with C_out.

        Runs in the host's forward for every step, so it calls ``F.linear`` on the projections'
        weights directly and skips identity stages (a module call costs microseconds on a CPU).
        """
        h = x if self.channel_dim == -1 else x.movedim(1, -1)  # (..., C_in)
        if not isinstance(self.norm, nn.Identity):
            h = self.norm(h)
        h = F.linear(h, self.down.weight, self.down.bias)  # (..., hidden)
        if not isinstance(self.act, nn.Identity):
            h = self.act(h)
        y = F.linear(h, self.up.weight, self.up.bias)  # (..., C_out)
        return y if self.channel_dim == -1 else y.movedim(-1, 1)  # (N, C_out, *S)

    def linear_equivalent(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(weight, bias)`` of the single linear map this module computes, if it is linear.

        Returns ``None`` when the module has a non-linearity or a norm. Used to merge a fossilized
        low-rank kernel into a Linear host layer.
        """
        if not isinstance(self.act, nn.Identity) or not isinstance(self.norm, nn.Identity):
            return None
        weight = self.up.weight @ self.down.weight  # (C_out, C_in)
        if self.down.bias is None or self.up.bias is None:
            return weight, None
        return weight, self.up.weight @ self.down.bias + self.up.bias  # (C_out,)


class LowRankParams(BaseModel):
    """Hyperparameters of ``lowrank_adapter``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(default=8, ge=1, le=4096)
    activation: ActivationName = "identity"
    bias: bool = False


class LowRankAdapterFamily:
    """``lowrank_adapter``: a rank-r bottleneck ``up(act(down(x)))`` (LoRA when linear)."""

    name = "lowrank_adapter"
    params_model = LowRankParams

    def incompatibility(self, params: BaseModel, target: KernelTarget) -> str | None:
        """Any feature or channel target works; the rank must not exceed both widths."""
        assert isinstance(params, LowRankParams)
        if params.rank > max(target.in_features, target.out_features):
            return (
                f"rank {params.rank} exceeds both widths ({target.in_features}, "
                f"{target.out_features}); use a rank <= {max(target.in_features, target.out_features)}"
            )
        return None

    def initialize(self, module: nn.Module, params: BaseModel, generator: torch.Generator) -> None:
        """Default PyTorch initialisation from ``generator``, output stage zeroed."""
        initialize_kernel(module, generator)

    def build(self, params: BaseModel, target: KernelTarget) -> nn.Module:
        """A :class:`ChannelMLP` of hidden width ``rank``."""
        assert isinstance(params, LowRankParams)
        return ChannelMLP(
            target.in_features,
            params.rank,
            target.out_features,
            activation=make_activation(params.activation),
            channel_dim=target.channel_dim,
            bias=params.bias,
        )


class ResidualMLPParams(BaseModel):
    """Hyperparameters of ``residual_mlp``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden: int = Field(default=64, ge=1, le=65536)
    activation: ActivationName = "gelu"
    norm: bool = False


class ResidualMLPFamily:
    """``residual_mlp``: a two-layer MLP with bias and a non-linearity, optionally pre-normed."""

    name = "residual_mlp"
    params_model = ResidualMLPParams

    def incompatibility(self, params: BaseModel, target: KernelTarget) -> str | None:
        """Any feature or channel target works."""
        return None

    def initialize(self, module: nn.Module, params: BaseModel, generator: torch.Generator) -> None:
        """Default PyTorch initialisation from ``generator``, output stage zeroed."""
        initialize_kernel(module, generator)

    def build(self, params: BaseModel, target: KernelTarget) -> nn.Module:
        """A :class:`ChannelMLP` of hidden width ``hidden`` with biases."""
        assert isinstance(params, ResidualMLPParams)
        return ChannelMLP(
            target.in_features,
            params.hidden,
            target.out_features,
            activation=make_activation(params.activation),
            channel_dim=target.channel_dim,
            bias=True,
            norm=params.norm,
        )


register_family(LowRankAdapterFamily())
register_family(ResidualMLPFamily())
