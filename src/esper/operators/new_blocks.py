"""New blocks for DEEPEN: fresh residual blocks that start as the identity, and stack copies.

Every block built here is made of torch classes only (a ``torch.fx.GraphModule`` or a copy of the
host's own block), so once fossilized it is an ordinary submodule and nothing of Esper is needed
to run or load it. A *recipe* (a small JSON-able dict) says how to build a block's structure
again, so a checkpoint can rebuild it before its weights are loaded.

* ``residual_mlp``: ``y = x + fc2(act(fc1(norm(x))))`` for a feature width; ``fc2`` is zero.
* ``residual_conv``: ``y = x + conv2(act(conv1(x)))`` (same channels, "same" padding); ``conv2``
  is zero.
* ``stack``: a structural copy of one of the stack's own blocks (a GPT's pre-LN attention + MLP
  block, an HF decoder layer): ``init="copy"`` keeps the source's weights (G_stack), ``"fresh"``
  re-initialises every sublayer and zeroes the *output projections* of its residual branches
  (:data:`OUTPUT_PROJECTIONS`), never a norm's gain (a zeroed gain kills its gradients).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from esper.errors import ConfigurationError

OUTPUT_PROJECTIONS: tuple[str, ...] = (
    "out_proj",  # nn.MultiheadAttention
    "linear2",  # nn.TransformerEncoderLayer / DecoderLayer
    "o_proj",  # Llama, Mistral, Qwen attention
    "down_proj",  # Llama-style MLP
    "c_proj",  # GPT-2 attention and MLP (transformers' Conv1D)
    "ff2",  # esper.tasks.hosts.TransformerBlock
    "fc2",
    "wo",
    "w2",
)
"""Names (last dotted component) of the layers that write a block's residual branches."""

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}
"""Activations a fresh residual block can use."""

PlainCopy = Callable[[nn.Module], nn.Module]
"""Makes a plain-torch deep copy of a (possibly seeded) block: ``esper.core.unwrap``'s."""


class _ResidualMLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str, norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.fc1 = nn.Linear(width, hidden)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))  # (..., width)


class _ResidualConv(nn.Module):
    def __init__(self, channels: int, dims: int, kernel_size: int, activation: str) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.conv1 = conv(channels, channels, kernel_size, padding=kernel_size // 2)
        self.act = ACTIVATIONS[activation]()
        self.conv2 = conv(channels, channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(x)))  # (B, C, L) or (B, C, H, W)


def residual_mlp_recipe(
    width: int, *, hidden: int | None, activation: str, norm: bool
) -> dict[str, Any]:
    """The recipe of a fresh residual MLP block of ``width`` features."""
    _check_activation(activation)
    return {
        "family": "residual_mlp",
        "width": _positive("width", width),
        "hidden": _positive("hidden", width if hidden is None else hidden),
        "activation": activation,
        "norm": bool(norm),
    }


def residual_conv_recipe(
    channels: int, *, dims: int, kernel_size: int, activation: str
) -> dict[str, Any]:
    """The recipe of a fresh residual conv block of ``channels`` channels (``dims`` 1 or 2)."""
    _check_activation(activation)
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ConfigurationError(f"kernel_size must be odd and positive, got {kernel_size!r}")
    return {
        "family": "residual_conv",
        "channels": _positive("channels", channels),
        "dims": dims,
        "kernel_size": kernel_size,
        "activation": activation,
    }


def build_residual_block(recipe: Mapping[str, Any]) -> nn.Module:
    """A fresh ``residual_mlp``/``residual_conv`` block (output layer zero), as an fx module."""
    family = recipe.get("family")
    root: nn.Module
    output: nn.Module
    if family == "residual_mlp":
        root = _ResidualMLP(recipe["width"], recipe["hidden"], recipe["activation"], recipe["norm"])
        output = root.fc2
    elif family == "residual_conv":
        root = _ResidualConv(
            recipe["channels"], recipe["dims"], recipe["kernel_size"], recipe["activation"]
        )
        output = root.conv2
    else:
        raise ConfigurationError(f"unknown fresh block family {family!r}")
    _zero(output)
    name = "ResidualMLPBlock" if family == "residual_mlp" else "ResidualConvBlock"
    traced = fx.symbolic_trace(root)
    return fx.GraphModule(traced, traced.graph, class_name=name)


def stack_block(
    source: nn.Module,
    *,
    init: str,
    plain_copy: PlainCopy,
    output_projections: Sequence[str] = OUTPUT_PROJECTIONS,
) -> nn.Module:
    """A new block shaped like ``source`` (a block of the stack): its copy (``"copy"``), or a
    re-initialised copy whose residual output projections are zero (``"fresh"``).

    Raises:
        ConfigurationError: ``"fresh"`` and no output projection named in
            ``output_projections`` was found in the block.
    """
    block = structure_of(source, plain_copy)
    if init == "copy":
        return block
    _reinitialise(block)
    zeroed = [
        name
        for name, module in block.named_modules()
        if name.rpartition(".")[2] in output_projections and _zero(module)
    ]
    if not zeroed:
        found = [name for name, m in block.named_modules() if name and not any(m.children())]
        raise ConfigurationError(
            f"cannot start a fresh {type(source).__name__} as the identity: none of its layers "
            f"is named like an output projection ({', '.join(output_projections)}); its layers "
            f"are {', '.join(found[:12])}. Pass output_projections=[...] naming the layers that "
            "write its residual branches, or use init='copy'"
        )
    return block


def structure_of(source: nn.Module, plain_copy: PlainCopy) -> nn.Module:
    """A plain copy of ``source`` (also the structure a checkpoint loads weights into); a seeded
    layer is copied from inside a container so that it, too, comes back as its base."""
    copied = plain_copy(nn.Sequential(source))
    return next(iter(copied.children()))


def to_host(block: nn.Module, reference: nn.Module) -> nn.Module:
    """``block`` on the device and in the floating dtype of ``reference``'s first tensor."""
    tensor = next(iter((*reference.parameters(), *reference.buffers())), None)
    if tensor is None:
        return block
    if tensor.is_floating_point():
        return block.to(device=tensor.device, dtype=tensor.dtype)
    return block.to(device=tensor.device)


def _reinitialise(block: nn.Module) -> None:
    for module in block.modules():
        reset = getattr(module, "reset_parameters", None) or getattr(
            module, "_reset_parameters", None
        )
        if callable(reset) and module is not block:
            reset()


def _zero(module: nn.Module) -> bool:
    """Zero ``module``'s own weight and bias; whether it had any."""
    tensors = [t for n, t in module.named_parameters(recurse=False) if n in ("weight", "bias")]
    with torch.no_grad():
        for tensor in tensors:
            tensor.zero_()
    return bool(tensors)


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ConfigurationError(
            f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
        )


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive int, got {value!r}")
    return value


def deep_copy(module: nn.Module) -> nn.Module:
    """A deep copy (the ``plain_copy`` for hosts without seeded layers)."""
    return copy.deepcopy(module)
