"""Blueprint registry: validating specs, compatibility, deterministic function-preserving builds."""

from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from esper.blueprints import (
    build_kernel,
    check_compatible,
    family_names,
    get_family,
    is_compatible,
    parse_params,
    register_family,
    torch_dtype,
)
from esper.contracts import BlueprintSpec, KernelTarget, LayerKind
from esper.errors import BlueprintError

LINEAR = KernelTarget(
    layer_kind=LayerKind.LINEAR, in_features=8, out_features=4, channel_dim=-1, spatial_dims=0
)
CONV2D = KernelTarget(
    layer_kind=LayerKind.CONV2D, in_features=6, out_features=6, channel_dim=1, spatial_dims=2
)


def test_built_in_families_are_registered() -> None:
    assert {"lowrank_adapter", "residual_mlp", "conv_adapter"} <= set(family_names())
    assert family_names() == sorted(family_names())


def test_unknown_family_lists_the_known_ones() -> None:
    with pytest.raises(BlueprintError, match="unknown blueprint family 'no_such_family'") as info:
        get_family("no_such_family")
    assert "lowrank_adapter" in str(info.value)


def test_registering_a_name_twice_is_refused() -> None:
    with pytest.raises(BlueprintError, match="already registered"):
        register_family(get_family("lowrank_adapter"))


def test_params_are_validated_with_defaults() -> None:
    params = parse_params(BlueprintSpec(family="lowrank_adapter"))

    assert params.model_dump() == {"rank": 8, "activation": "identity", "bias": False}


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"rank": 0}, "rank"),
        ({"activation": "softmax"}, "activation"),
        ({"rnak": 4}, "rnak"),
    ],
)
def test_bad_params_name_the_field(params: dict[str, object], problem: str) -> None:
    spec = BlueprintSpec.model_validate({"family": "lowrank_adapter", "params": params})

    with pytest.raises(BlueprintError, match="invalid parameters") as info:
        parse_params(spec)
    assert problem in str(info.value)


def test_conv_adapter_cannot_target_a_linear_layer() -> None:
    spec = BlueprintSpec(family="conv_adapter")

    assert not is_compatible(spec, LINEAR)
    assert is_compatible(spec, CONV2D)
    with pytest.raises(BlueprintError, match="cannot target linear 8->4"):
        check_compatible(spec, LINEAR)
    with pytest.raises(BlueprintError):
        build_kernel(spec, LINEAR)


def test_rank_larger_than_both_widths_is_incompatible() -> None:
    assert is_compatible(BlueprintSpec(family="lowrank_adapter", params={"rank": 8}), LINEAR)
    assert not is_compatible(BlueprintSpec(family="lowrank_adapter", params={"rank": 9}), LINEAR)


def test_build_is_deterministic_in_the_init_seed() -> None:
    spec = BlueprintSpec(family="residual_mlp", params={"hidden": 5})

    a = build_kernel(spec, LINEAR, init_seed=3)
    b = build_kernel(spec, LINEAR, init_seed=3)
    c = build_kernel(spec, LINEAR, init_seed=4)

    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.state_dict()["down.weight"], c.state_dict()["down.weight"])


def test_build_does_not_disturb_the_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_kernel(BlueprintSpec(family="residual_mlp"), LINEAR, init_seed=7)

    assert torch.equal(torch.rand(3), expected)


def test_build_honours_target_dtype() -> None:
    kernel = build_kernel(
        BlueprintSpec(family="lowrank_adapter", params={"rank": 2}),
        LINEAR.model_copy(update={"dtype": "float64"}),
    )

    assert {p.dtype for p in kernel.parameters()} == {torch.float64}


def test_torch_dtype_names() -> None:
    assert torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(BlueprintError, match="unsupported kernel dtype 'int8'"):
        torch_dtype("int8")


class _ScaleParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    scale: float = 0.0


class _ScaleFamily:
    """A test-only family: ``x -> scale * x`` (registered under a name no other test uses)."""

    name = "test_registry_scale"
    params_model = _ScaleParams

    def incompatibility(self, params: BaseModel, target: KernelTarget) -> str | None:
        return None if target.in_features == target.out_features else "needs in == out"

    def build(self, params: BaseModel, target: KernelTarget) -> nn.Module:
        assert isinstance(params, _ScaleParams)
        module = nn.Linear(target.in_features, target.out_features, bias=False)
        nn.init.eye_(module.weight)
        module.weight.data.mul_(params.scale)
        return module


def test_a_registered_family_is_built_through_the_registry() -> None:
    if "test_registry_scale" not in family_names():
        register_family(_ScaleFamily())
    square = LINEAR.model_copy(update={"out_features": 8})
    spec = BlueprintSpec(family="test_registry_scale", params={"scale": 2.0})

    kernel = build_kernel(spec, square)

    x = torch.arange(8.0).reshape(1, 8)
    assert torch.equal(kernel(x), 2 * x)
    with pytest.raises(BlueprintError, match="needs in == out"):
        build_kernel(spec, LINEAR)
