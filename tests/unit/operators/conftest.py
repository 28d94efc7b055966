"""Hosts for the widen tests: the four architectures the operator is built for, and their inputs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn


class GPTBlock(nn.Module):
    """A plain-PyTorch GPT-style block: pre-norm attention and an fc -> GELU -> proj MLP."""

    def __init__(self, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.proj(self.act(self.fc(self.ln_2(x))))


class ConvNet(nn.Module):
    """Conv2d -> BatchNorm2d -> ReLU -> Conv2d, then a pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv2(self.relu(self.bn(self.conv1(x)))).mean(dim=(2, 3)))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 5))


def mlp_layer_norm() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 5))


HOSTS: dict[str, tuple[Callable[[], nn.Module], str, tuple[int, ...]]] = {
    "linear_act_linear": (mlp, "0", (8, 10)),
    "linear_layernorm_act_linear": (mlp_layer_norm, "0", (8, 10)),
    "conv_bn_relu_conv": (ConvNet, "conv1", (4, 3, 8, 8)),
    "gpt_mlp": (GPTBlock, "fc", (2, 5, 16)),
}
"""name -> (host factory, layer to widen, input shape)."""


@pytest.fixture(params=sorted(HOSTS))
def host_case(request: pytest.FixtureRequest) -> tuple[str, nn.Module, str, torch.Tensor]:
    """``(name, host, layer to widen, input)``, seeded."""
    factory, layer, shape = HOSTS[request.param]
    torch.manual_seed(0)
    return request.param, factory(), layer, torch.randn(shape)


@pytest.fixture
def gpt_case() -> tuple[nn.Module, torch.Tensor]:
    """A seeded GPT-style block and its input ``(B, T, C)``."""
    torch.manual_seed(0)
    return GPTBlock(), torch.randn(2, 5, 16)


@pytest.fixture
def conv_case() -> tuple[nn.Module, torch.Tensor]:
    """A seeded Conv -> BatchNorm -> ReLU -> Conv net and its input ``(B, C, H, W)``."""
    torch.manual_seed(0)
    return ConvNet(), torch.randn(4, 3, 8, 8)
