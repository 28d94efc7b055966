"""Host models: the small networks a run starts from (MLP, CNN, transformer).

Every host reads flat examples ``(B, F)`` — the layout of :class:`~esper.tasks.datasets.TensorSplit`
— and returns ``(B, num_outputs)``; convolutional and sequence hosts reshape the features
themselves. Layers carry readable names (``fc1``, ``conv1``, ``blocks.0.ff1``…), which is what a
run's ``seeds.target`` selects and what the report shows.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from esper.errors import ConfigurationError

HOSTS: tuple[str, ...] = ("mlp", "cnn", "transformer")
"""Names accepted by :func:`build_host`."""

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "identity": nn.Identity}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ConfigurationError(
            f"unknown activation {name!r}; choose one of {', '.join(_ACTIVATIONS)}"
        )
    return _ACTIVATIONS[name]()


def build_mlp(
    in_features: int,
    out_features: int,
    *,
    hidden: Sequence[int] = (32,),
    activation: str = "relu",
) -> nn.Sequential:
    """``fc1 -> act1 -> … -> out``: one Linear per entry of ``hidden`` plus the output layer.

    ``activation="identity"`` gives a deep *linear* network: a host whose missing non-linearity
    a residual kernel can supply.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width = in_features
    for i, size in enumerate(hidden, start=1):
        layers[f"fc{i}"] = nn.Linear(width, size)
        layers[f"act{i}"] = _activation(activation)
        width = size
    layers["out"] = nn.Linear(width, out_features)
    return nn.Sequential(layers)


class ConvNet(nn.Module):
    """Convolutions over a 1-D signal or a 2-D image, global average pooling, a Linear head.

    Args:
        input_shape: one example's layout ``(C, L)`` or ``(C, H, W)``; inputs arrive flat.
        out_features: outputs.
        channels: output channels of each convolution (``conv1``, ``conv2``…).
        kernel_size: odd kernel size; padding keeps the spatial size.
        activation: after every convolution.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        out_features: int,
        *,
        channels: Sequence[int] = (16, 16),
        kernel_size: int = 3,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if len(input_shape) not in (2, 3):
            raise ConfigurationError(
                f"a cnn host needs an example layout (C, L) or (C, H, W), got {tuple(input_shape)}; "
                "use a dataset with an input_shape (digits, mnist1d) or the mlp host"
            )
        if kernel_size % 2 != 1:
            raise ConfigurationError(f"cnn kernel_size must be odd, got {kernel_size}")
        self.input_shape = tuple(int(d) for d in input_shape)
        conv = nn.Conv1d if len(input_shape) == 2 else nn.Conv2d
        convs: OrderedDict[str, nn.Module] = OrderedDict()
        width = self.input_shape[0]
        for i, size in enumerate(channels, start=1):
            convs[f"conv{i}"] = conv(width, size, kernel_size, padding=kernel_size // 2)
            convs[f"act{i}"] = _activation(activation)
            width = size
        self.features = nn.Sequential(convs)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, F)`` flat examples -> ``(B, out_features)``."""
        h = x.reshape(x.shape[0], *self.input_shape)  # (B, C, L) or (B, C, H, W)
        h = self.features(h)  # (B, C', *S)
        return self.head(h.flatten(2).mean(dim=2))  # (B, C') -> (B, out)


class TransformerBlock(nn.Module):
    """Pre-norm transformer encoder block: ``x + attn(ln1(x))``, then ``x + ff2(act(ff1(ln2(x))))``.

    Written out (rather than ``nn.TransformerEncoderLayer``) so every sub-layer is a named module
    that can carry seeds and the fused inference path never hides one.
    """

    def __init__(self, d_model: int, heads: int, ff: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, ff)
        self.act = nn.GELU()
        self.ff2 = nn.Linear(ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` -> ``(B, T, D)``."""
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ff2(self.act(self.ff1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Patches of the flat input as tokens, a few transformer blocks, mean pooling, a Linear head.

    Args:
        in_features: flat input width; must be a multiple of ``patch``.
        out_features: outputs.
        patch: features per token (``in_features // patch`` tokens).
        d_model: token width.
        heads: attention heads (must divide ``d_model``).
        depth: transformer blocks.
        ff: hidden width of each block's feed-forward part.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        patch: int = 8,
        d_model: int = 32,
        heads: int = 4,
        depth: int = 2,
        ff: int = 64,
    ) -> None:
        super().__init__()
        if in_features % patch or d_model % heads:
            raise ConfigurationError(
                f"transformer host: patch ({patch}) must divide the input width ({in_features}) "
                f"and heads ({heads}) must divide d_model ({d_model})"
            )
        self.patch = patch
        self.tokens = in_features // patch
        self.embed = nn.Linear(patch, d_model)
        self.position = nn.Parameter(torch.randn(self.tokens, d_model) / math.sqrt(d_model))
        self.blocks = nn.ModuleList(TransformerBlock(d_model, heads, ff) for _ in range(depth))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, F)`` flat examples -> ``(B, out_features)``."""
        tokens = x.reshape(x.shape[0], self.tokens, self.patch)  # (B, T, P)
        h = self.embed(tokens) + self.position  # (B, T, D)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))  # (B, D) -> (B, out)


def build_host(
    kind: str,
    *,
    in_features: int,
    out_features: int,
    input_shape: Sequence[int] = (),
    options: dict[str, object] | None = None,
) -> nn.Module:
    """A host of ``kind`` (one of :data:`HOSTS`) for a task's input and output widths.

    Args:
        kind: ``mlp``, ``cnn`` or ``transformer``.
        in_features: flat input width.
        out_features: output width.
        input_shape: one example's layout, needed by ``cnn``.
        options: the host's own keyword arguments (``hidden``, ``channels``, ``d_model``…).

    Raises:
        ConfigurationError: unknown kind or option.
    """
    options = dict(options or {})
    try:
        if kind == "mlp":
            return build_mlp(in_features, out_features, **options)  # type: ignore[arg-type]
        if kind == "cnn":
            return ConvNet(input_shape, out_features, **options)  # type: ignore[arg-type]
        if kind == "transformer":
            return TinyTransformer(in_features, out_features, **options)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ConfigurationError(f"host {kind!r} got an invalid option: {exc}") from exc
    raise ConfigurationError(f"unknown host {kind!r}; choose one of {', '.join(HOSTS)}")
