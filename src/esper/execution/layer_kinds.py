"""Layer kinds: which host modules can carry seeds, and where a kernel reads and writes on each.

A kernel always adds to the host layer's output. What it *reads* depends on the kind:

* Linear, LayerNorm, BatchNorm1d/2d: the layer's input ``x`` (``y = base(x) + Σ α·k(x)``), so a
  Linear kernel is a parallel branch from ``in_features`` to ``out_features`` (LoRA-style);
* Conv1d/Conv2d: the layer's output feature map ``h`` (``y = h + Σ α·k(h)``), so an adapter need
  not reproduce the host's stride, padding and dilation;
* MultiheadAttention: the attention output (``attn_output``, first element of its tuple).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from torch import nn

from esper.contracts import KernelTarget, LayerKind


class GraftPoint(Enum):
    """Which tensor a layer's kernels read."""

    INPUT = "input"
    OUTPUT = "output"


@dataclass(frozen=True)
class LayerProfile:
    """How seeds attach to one host layer."""

    kind: LayerKind
    graft_point: GraftPoint
    in_features: int
    out_features: int
    channel_dim: int
    spatial_dims: int
    returns_tuple: bool = False
    """Whether the host returns a tuple whose first element is the output (MultiheadAttention)."""

    def target(self, *, dtype: str, device: str) -> KernelTarget:
        """The kernel geometry seeds of this layer accept."""
        return KernelTarget(
            layer_kind=self.kind,
            in_features=self.in_features,
            out_features=self.out_features,
            channel_dim=self.channel_dim,
            spatial_dims=self.spatial_dims,
            dtype=dtype,
            device=device,
        )


SUPPORTED_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.LayerNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.MultiheadAttention,
)
"""Module types that can be wrapped (subclasses included)."""


def profile_layer(module: nn.Module) -> LayerProfile | None:
    """The seed-attachment profile of ``module``, or ``None`` if its type is not supported."""
    # Order matters: MultiheadAttention's out_proj is a Linear subclass, but never called as one.
    if isinstance(module, nn.MultiheadAttention):
        d = module.embed_dim
        return LayerProfile(
            LayerKind.MULTIHEAD_ATTENTION, GraftPoint.OUTPUT, d, d, -1, 0, returns_tuple=True
        )
    if isinstance(module, nn.Linear):
        return LayerProfile(
            LayerKind.LINEAR, GraftPoint.INPUT, module.in_features, module.out_features, -1, 0
        )
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        kind = LayerKind.CONV1D if isinstance(module, nn.Conv1d) else LayerKind.CONV2D
        spatial = 1 if kind is LayerKind.CONV1D else 2
        c = module.out_channels
        return LayerProfile(kind, GraftPoint.OUTPUT, c, c, 1, spatial)
    if isinstance(module, nn.LayerNorm):
        f = module.normalized_shape[-1]
        return LayerProfile(LayerKind.LAYER_NORM, GraftPoint.INPUT, f, f, -1, 0)
    if isinstance(module, nn.BatchNorm2d):
        c = module.num_features
        return LayerProfile(LayerKind.BATCH_NORM2D, GraftPoint.INPUT, c, c, 1, 2)
    if isinstance(module, nn.BatchNorm1d):
        c = module.num_features
        return LayerProfile(LayerKind.BATCH_NORM1D, GraftPoint.INPUT, c, c, 1, 0)
    return None
