"""Contract models: frozen, strict about unknown fields, validated, and deterministic ids."""

from __future__ import annotations

import hashlib

import pydantic
import pytest

from esper.contracts import (
    BlueprintSpec,
    CacheStats,
    HealthSignal,
    KernelTarget,
    LayerKind,
    LayerStats,
    ModelStats,
    SeedState,
)


def _target(**overrides: object) -> KernelTarget:
    fields: dict[str, object] = {
        "layer_kind": LayerKind.LINEAR,
        "in_features": 8,
        "out_features": 4,
        "channel_dim": -1,
        "spatial_dims": 0,
    }
    fields.update(overrides)
    return KernelTarget.model_validate(fields)


def test_contracts_are_frozen() -> None:
    target = _target()

    with pytest.raises(pydantic.ValidationError):
        target.in_features = 16  # type: ignore[misc]
    assert target.in_features == 8


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(pydantic.ValidationError, match="extra"):
        _target(colour="red")


@pytest.mark.parametrize(
    "overrides",
    [{"channel_dim": 0}, {"channel_dim": 2}, {"in_features": 0}, {"spatial_dims": 3}],
    ids=["channel_dim_0", "channel_dim_2", "no_features", "3d"],
)
def test_kernel_target_rejects_impossible_geometry(overrides: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError):
        _target(**overrides)


def test_same_geometry_ignores_dtype_device_and_kind_but_not_shape() -> None:
    base = _target()

    assert base.same_geometry(_target(dtype="float64", device="meta"))
    assert base.same_geometry(_target(layer_kind=LayerKind.LAYER_NORM))
    assert not base.same_geometry(_target(in_features=16))
    assert not base.same_geometry(_target(out_features=8))
    assert not base.same_geometry(_target(channel_dim=1))


def test_describe_names_kind_and_shape() -> None:
    assert _target().describe() == "linear 8->4"
    conv = _target(layer_kind=LayerKind.CONV2D, channel_dim=1, spatial_dims=2)
    assert conv.describe() == "conv2d 8->4 (2d spatial)"


def test_blueprint_id_is_sha256_of_canonical_json_whatever_the_key_order() -> None:
    a = BlueprintSpec(family="lowrank_adapter", params={"rank": 4, "bias": True})
    b = BlueprintSpec(family="lowrank_adapter", params={"bias": True, "rank": 4})

    assert a.canonical_json() == '{"family":"lowrank_adapter","params":{"bias":true,"rank":4}}'
    assert a.blueprint_id == b.blueprint_id
    assert a.blueprint_id == hashlib.sha256(a.canonical_json().encode()).hexdigest()
    assert (
        a.blueprint_id != BlueprintSpec(family="lowrank_adapter", params={"rank": 5}).blueprint_id
    )


@pytest.mark.parametrize("family", ["", "Upper", "9lives", "has-dash", "x" * 65])
def test_blueprint_family_names_are_restricted(family: str) -> None:
    with pytest.raises(pydantic.ValidationError):
        BlueprintSpec(family=family)


def test_cache_hit_rate_counts_coalesced_requests() -> None:
    stats = CacheStats(
        entries=1,
        bytes=10,
        max_entries=2,
        max_bytes=100,
        pinned=0,
        hits=6,
        misses=2,
        coalesced=2,
        evictions=0,
        load_failures=0,
    )

    assert stats.hit_rate == 0.6
    empty = stats.model_copy(update={"hits": 0, "misses": 0, "coalesced": 0})
    assert empty.hit_rate == 0.0


def test_model_stats_total_parameters() -> None:
    layer = LayerStats(
        layer_name="fc1",
        layer_kind=LayerKind.LINEAR,
        base_parameters=100,
        kernel_parameters=20,
        seeds_by_state={SeedState.DORMANT: 1},
        kernel_ids=(None,),
    )
    stats = ModelStats(
        layers=(layer,), base_parameters=100, kernel_parameters=20, seeds_by_state={}
    )

    assert stats.total_parameters == 120


def test_health_signal_bounds_dead_fraction() -> None:
    fields = {
        "layer_name": "fc1",
        "layer_kind": "linear",
        "step": 0,
        "timestamp": 0.0,
        "samples": 1,
        "output_mean": 0.0,
        "output_std": 0.0,
        "seeds": (),
    }

    assert HealthSignal.model_validate({**fields, "dead_fraction": 1.0}).dead_fraction == 1.0
    with pytest.raises(pydantic.ValidationError):
        HealthSignal.model_validate({**fields, "dead_fraction": 1.5})
