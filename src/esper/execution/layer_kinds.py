"""Layer kinds: the built-in kinds of host layer that carry seeds, and a module's seed profile.

A kernel always adds to the host layer's output. What it *reads* depends on the kind:

* Linear, LayerNorm, BatchNorm1d/2d: the layer's input ``x`` (``y = base(x) + Σ α·k(x)``), so a
  Linear kernel is a parallel branch from ``in_features`` to ``out_features`` (LoRA-style);
* GPT-2's ``Conv1D`` (``transformers.pytorch_utils.Conv1D``, a Linear whose weight is stored
  ``(in, out)``): its input, exactly as a Linear;
* RMSNorm (``nn.RMSNorm`` and the ``*RMSNorm`` classes of HF models such as ``LlamaRMSNorm``,
  recognised by name and shape, never imported): its input, exactly as a LayerNorm;
* Conv1d/Conv2d: the layer's output feature map ``h`` (``y = h + Σ α·k(h)``), so an adapter need
  not reproduce the host's stride, padding and dilation;
* MultiheadAttention: the attention output (``attn_output``, first element of its tuple);
* Embedding: the looked-up vectors ``e = weight[ids]`` (``y = e + Σ α·k(e)``). The input is a
  tensor of integer ids, which no feature kernel can read; the vectors are what the rest of the
  model reads, and a linear kernel on them folds exactly into the table (``weight Tᵀ + c``).

Each is registered with :func:`~esper.execution.layer_kind_registry.register_layer_kind`, the
same call a user makes for their own kind; :func:`profile_layer` reads any registered kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from esper.contracts import KernelTarget, LayerKind
from esper.errors import ConfigurationError
from esper.execution.layer_kind_registry import (
    GraftPoint,
    LayerGeometry,
    kind_of,
    register_layer_kind,
)

HF_CONV1D_PATH = "transformers.pytorch_utils.Conv1D"
"""GPT-2's projection class, matched by name so ``transformers`` is never imported here."""


@dataclass(frozen=True)
class LayerProfile:
    """How seeds attach to one host layer."""

    kind: str
    graft_point: GraftPoint
    in_features: int
    out_features: int
    channel_dim: int
    spatial_dims: int
    returns_tuple: bool = False
    """Whether the host returns a tuple whose first element is the output (MultiheadAttention)."""
    merge: str | None = None
    """How kept linear kernels fold into the host's weights (see ``MERGE_RULES``), if they do."""

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


def profile_layer(module: nn.Module) -> LayerProfile | None:
    """The seed-attachment profile of ``module``, or ``None`` if no layer kind covers it.

    Raises:
        ConfigurationError: the kind's geometry function fails on ``module`` or describes a
            geometry no kernel can have.
    """
    spec = kind_of(module)
    if spec is None:
        return None
    where = f"layer kind {spec.name!r} on {type(module).__name__}"
    try:
        geometry = spec.geometry(module)
    except Exception as exc:
        raise ConfigurationError(
            f"{where}: its geometry function raised {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(geometry, LayerGeometry):
        raise ConfigurationError(
            f"{where}: its geometry function returned {type(geometry).__name__}, not a "
            "LayerGeometry"
        )
    problem = geometry.problem()
    if problem is not None:
        raise ConfigurationError(f"{where}: bad geometry {geometry}: {problem}")
    return LayerProfile(
        kind=spec.name,
        graft_point=spec.reads,
        in_features=geometry.in_features,
        out_features=geometry.out_features,
        channel_dim=geometry.channel_dim,
        spatial_dims=geometry.spatial_dims,
        returns_tuple=spec.returns_tuple,
        merge=spec.merge,
    )


# -- the built-in kinds ------------------------------------------------------------------------


def _features(in_features: int, out_features: int) -> LayerGeometry:
    return LayerGeometry(in_features, out_features)


def _linear(module: nn.Module) -> LayerGeometry:
    assert isinstance(module, nn.Linear)
    return _features(module.in_features, module.out_features)


def _conv(module: nn.Module) -> LayerGeometry:
    assert isinstance(module, nn.Conv1d | nn.Conv2d)
    c = module.out_channels
    return LayerGeometry(c, c, channel_dim=1, spatial_dims=len(module.kernel_size))


def _last_dim_norm(module: nn.Module) -> LayerGeometry:
    """LayerNorm/RMSNorm: the last normalised dimension (``(4, 10)`` reads 10 features)."""
    shape = getattr(module, "normalized_shape", None)
    width = shape[-1] if shape else module.get_parameter("weight").shape[-1]
    return _features(int(width), int(width))


def _batch_norm(spatial_dims: int) -> Callable[[nn.Module], LayerGeometry]:
    def geometry(module: nn.Module) -> LayerGeometry:
        assert isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d)
        c = module.num_features
        return LayerGeometry(c, c, channel_dim=1, spatial_dims=spatial_dims)

    return geometry


def _attention(module: nn.Module) -> LayerGeometry:
    assert isinstance(module, nn.MultiheadAttention)
    return _features(module.embed_dim, module.embed_dim)


def _hf_conv1d(module: nn.Module) -> LayerGeometry:
    """GPT-2's Conv1D: ``y = x @ weight + bias`` with ``weight`` of shape ``(in, out)``."""
    in_features, out_features = module.get_parameter("weight").shape
    return _features(int(in_features), int(out_features))


def _embedding(module: nn.Module) -> LayerGeometry:
    assert isinstance(module, nn.Embedding)
    return _features(module.embedding_dim, module.embedding_dim)


def is_rms_norm_style(module: nn.Module) -> bool:
    """An RMSNorm of another library (``LlamaRMSNorm``, ``MistralRMSNorm``, ``Qwen2RMSNorm``...):
    a class named ``*RMSNorm`` with a 1-D ``weight`` parameter over the last dimension."""
    weight = module._parameters.get("weight")
    return type(module).__name__.endswith("RMSNorm") and weight is not None and weight.dim() == 1


register_layer_kind(
    LayerKind.MULTIHEAD_ATTENTION,
    module_types=[nn.MultiheadAttention],
    geometry=_attention,
    reads="output",
    returns_tuple=True,
    merge="attention_output",
)
register_layer_kind(
    LayerKind.LINEAR, module_types=[nn.Linear], geometry=_linear, merge="linear_input"
)
register_layer_kind(
    LayerKind.CONV1D,
    module_types=[nn.Conv1d],
    geometry=_conv,
    reads="output",
    merge="affine_output",
)
register_layer_kind(
    LayerKind.CONV2D,
    module_types=[nn.Conv2d],
    geometry=_conv,
    reads="output",
    merge="affine_output",
)
register_layer_kind(LayerKind.LAYER_NORM, module_types=[nn.LayerNorm], geometry=_last_dim_norm)
register_layer_kind(LayerKind.BATCH_NORM1D, module_types=[nn.BatchNorm1d], geometry=_batch_norm(0))
register_layer_kind(LayerKind.BATCH_NORM2D, module_types=[nn.BatchNorm2d], geometry=_batch_norm(2))
register_layer_kind(
    LayerKind.HF_CONV1D,
    module_types=[HF_CONV1D_PATH],
    geometry=_hf_conv1d,
    merge="transposed_linear_input",
    like="linear",
)
register_layer_kind(
    LayerKind.RMS_NORM,
    module_types=[nn.RMSNorm],
    matches=is_rms_norm_style,
    geometry=_last_dim_norm,
    like="layer_norm",
)
register_layer_kind(
    LayerKind.EMBEDDING,
    module_types=[nn.Embedding],
    geometry=_embedding,
    reads="output",
    merge="embedding_output",
    like="linear",
)
