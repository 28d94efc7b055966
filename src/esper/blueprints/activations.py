"""Activation functions a blueprint may name, by their spec string."""

from __future__ import annotations

from typing import Literal

from torch import nn

ActivationName = Literal["identity", "relu", "gelu", "tanh", "silu"]


def make_activation(name: ActivationName) -> nn.Module:
    """A fresh activation module for ``name``."""
    activations: dict[str, type[nn.Module]] = {
        "identity": nn.Identity,
        "relu": nn.ReLU,
        "gelu": nn.GELU,
        "tanh": nn.Tanh,
        "silu": nn.SiLU,
    }
    return activations[name]()
