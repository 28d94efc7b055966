"""Built-in kernel families: shapes, zero output when fresh, and the linear-map view of LoRA."""

from __future__ import annotations

import pytest
import torch

from esper.blueprints import build_kernel
from esper.blueprints.feature_adapters import ChannelMLP
from esper.contracts import BlueprintSpec, KernelTarget, LayerKind


def _target(kind: LayerKind, c_in: int, c_out: int, channel_dim: int, spatial: int) -> KernelTarget:
    return KernelTarget(
        layer_kind=kind,
        in_features=c_in,
        out_features=c_out,
        channel_dim=channel_dim,
        spatial_dims=spatial,
    )


CASES = [
    # (spec, target, input shape, output shape)
    (
        BlueprintSpec(family="lowrank_adapter", params={"rank": 3}),
        _target(LayerKind.LINEAR, 8, 5, -1, 0),
        (2, 7, 8),
        (2, 7, 5),
    ),
    (
        BlueprintSpec(family="residual_mlp", params={"hidden": 6, "norm": True}),
        _target(LayerKind.LAYER_NORM, 8, 8, -1, 0),
        (4, 8),
        (4, 8),
    ),
    (
        BlueprintSpec(family="residual_mlp", params={"hidden": 6}),
        _target(LayerKind.BATCH_NORM1D, 5, 5, 1, 0),
        (4, 5, 9),
        (4, 5, 9),
    ),
    (
        BlueprintSpec(family="conv_adapter", params={"hidden": 4}),
        _target(LayerKind.CONV2D, 6, 6, 1, 2),
        (2, 6, 5, 7),
        (2, 6, 5, 7),
    ),
    (
        BlueprintSpec(family="conv_adapter", params={"mode": "depthwise", "activation": "gelu"}),
        _target(LayerKind.CONV1D, 6, 6, 1, 1),
        (2, 6, 11),
        (2, 6, 11),
    ),
]


@pytest.mark.parametrize(("spec", "target", "in_shape", "out_shape"), CASES)
def test_fresh_kernel_has_the_right_shape_and_outputs_exact_zero(
    spec: BlueprintSpec,
    target: KernelTarget,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
) -> None:
    kernel = build_kernel(spec, target, init_seed=1)
    x = torch.randn(in_shape)

    out = kernel(x)

    assert out.shape == out_shape
    assert torch.equal(out, torch.zeros(out_shape))
    # Not a dead module: its other weights are initialised, only the output projection is zero.
    assert any(p.abs().sum() > 0 for p in kernel.parameters())


@pytest.mark.parametrize(("spec", "target", "in_shape", "out_shape"), CASES)
def test_perturbed_kernel_gives_nonzero_output(
    spec: BlueprintSpec,
    target: KernelTarget,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
) -> None:
    kernel = build_kernel(spec, target, init_seed=1)
    with torch.no_grad():
        for p in kernel.parameters():
            p.add_(0.1)

    assert kernel(torch.randn(in_shape)).abs().sum() > 0


def test_channels_first_mlp_mixes_channels_per_position() -> None:
    torch.manual_seed(0)
    mlp = ChannelMLP(5, 3, 4, activation=torch.nn.Tanh(), channel_dim=1, bias=True)
    torch.nn.init.normal_(mlp.up.weight)
    x = torch.randn(2, 5, 7)  # (N, C, L)

    out = mlp(x)

    # Position l of the output only depends on position l of the input.
    expected = torch.stack([mlp.up(torch.tanh(mlp.down(x[:, :, i]))) for i in range(7)], dim=-1)
    assert out.shape == (2, 4, 7)
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_lowrank_adapter_has_an_exact_linear_equivalent(bias: bool) -> None:
    target = _target(LayerKind.LINEAR, 8, 5, -1, 0)
    spec = BlueprintSpec(family="lowrank_adapter", params={"rank": 3, "bias": bias})
    kernel = build_kernel(spec, target, init_seed=2)
    assert isinstance(kernel, ChannelMLP)
    torch.nn.init.normal_(kernel.up.weight)
    if bias:
        torch.nn.init.normal_(kernel.up.bias)
        torch.nn.init.normal_(kernel.down.bias)
    x = torch.randn(6, 8)

    equivalent = kernel.linear_equivalent()

    assert equivalent is not None
    weight, b = equivalent
    assert weight.shape == (5, 8)
    assert (b is not None) is bias
    expected = x @ weight.T + (b if b is not None else 0)
    assert torch.allclose(kernel(x), expected, atol=1e-5)


def test_non_linear_kernels_have_no_linear_equivalent() -> None:
    target = _target(LayerKind.LINEAR, 8, 5, -1, 0)
    relu = build_kernel(
        BlueprintSpec(family="lowrank_adapter", params={"rank": 3, "activation": "relu"}), target
    )
    normed = build_kernel(BlueprintSpec(family="residual_mlp", params={"norm": True}), target)

    assert isinstance(relu, ChannelMLP)
    assert isinstance(normed, ChannelMLP)
    assert relu.linear_equivalent() is None
    assert normed.linear_equivalent() is None
