"""Layer kinds: which modules carry seeds, what geometry their kernels have, where they read."""

from __future__ import annotations

import pytest
from torch import nn

from esper.contracts import LayerKind
from esper.execution import GraftPoint, kind_of
from esper.execution.layer_kinds import profile_layer

CASES = [
    # module, kind, graft point, in, out, channel_dim, spatial dims, returns tuple
    (nn.Linear(8, 5), LayerKind.LINEAR, GraftPoint.INPUT, 8, 5, -1, 0, False),
    (nn.Conv1d(3, 6, 3, stride=2), LayerKind.CONV1D, GraftPoint.OUTPUT, 6, 6, 1, 1, False),
    (nn.Conv2d(3, 7, 3, padding=1), LayerKind.CONV2D, GraftPoint.OUTPUT, 7, 7, 1, 2, False),
    (nn.LayerNorm(10), LayerKind.LAYER_NORM, GraftPoint.INPUT, 10, 10, -1, 0, False),
    (nn.LayerNorm((4, 10)), LayerKind.LAYER_NORM, GraftPoint.INPUT, 10, 10, -1, 0, False),
    (nn.BatchNorm1d(6), LayerKind.BATCH_NORM1D, GraftPoint.INPUT, 6, 6, 1, 0, False),
    (nn.BatchNorm2d(6), LayerKind.BATCH_NORM2D, GraftPoint.INPUT, 6, 6, 1, 2, False),
    (
        nn.MultiheadAttention(8, 2, batch_first=True),
        LayerKind.MULTIHEAD_ATTENTION,
        GraftPoint.OUTPUT,
        8,
        8,
        -1,
        0,
        True,
    ),
]


@pytest.mark.parametrize(
    ("module", "kind", "point", "c_in", "c_out", "channel_dim", "spatial", "returns_tuple"),
    CASES,
    ids=[case[1].value + str(i) for i, case in enumerate(CASES)],
)
def test_profile_of_each_supported_layer(
    module: nn.Module,
    kind: LayerKind,
    point: GraftPoint,
    c_in: int,
    c_out: int,
    channel_dim: int,
    spatial: int,
    returns_tuple: bool,
) -> None:
    profile = profile_layer(module)

    assert profile is not None
    assert (profile.kind, profile.graft_point) == (kind, point)
    assert (profile.in_features, profile.out_features) == (c_in, c_out)
    assert (profile.channel_dim, profile.spatial_dims) == (channel_dim, spatial)
    assert profile.returns_tuple is returns_tuple
    target = profile.target(dtype="float64", device="cpu")
    assert target.layer_kind == kind
    assert (target.in_features, target.out_features, target.dtype) == (c_in, c_out, "float64")


@pytest.mark.parametrize("module", [nn.GRU(4, 4), nn.ReLU(), nn.Sequential(), nn.Conv3d(2, 2, 1)])
def test_unsupported_modules_have_no_profile(module: nn.Module) -> None:
    assert profile_layer(module) is None
    assert kind_of(module) is None


def test_subclasses_of_supported_types_are_supported() -> None:
    class MyLinear(nn.Linear):
        pass

    profile = profile_layer(MyLinear(3, 2))

    assert profile is not None
    assert profile.kind == LayerKind.LINEAR


def test_attention_out_proj_is_profiled_as_attention_not_linear() -> None:
    # NonDynamicallyQuantizableLinear is a Linear subclass: the attention check must come first.
    attention = nn.MultiheadAttention(8, 2)

    assert isinstance(attention.out_proj, nn.Linear)
    profile = profile_layer(attention)
    assert profile is not None
    assert profile.kind == LayerKind.MULTIHEAD_ATTENTION
