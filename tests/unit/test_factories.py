"""The test factories build what they say, with defaults that match the code they stand for."""

from __future__ import annotations

import hashlib

from esper.contracts import AdaptationAction, LayerKind, SeedState
from esper.tamiyo.observation import BLUEPRINT_CATALOG
from factories import (
    MLP_H32,
    FakeClock,
    conv2d_target,
    decision,
    germinate,
    health_signal,
    linear_target,
    seeds_in,
    sized_artifact,
)


def test_the_default_blueprint_is_the_catalogs_mlp_h32() -> None:
    assert next(o.spec for o in BLUEPRINT_CATALOG if o.name == "mlp_h32") == MLP_H32


def test_targets_have_their_layers_layout() -> None:
    linear, conv = linear_target(16, 8), conv2d_target(4, 6)

    assert (linear.layer_kind, linear.channel_dim, linear.spatial_dims) == (LayerKind.LINEAR, -1, 0)
    assert (conv.layer_kind, conv.channel_dim, conv.spatial_dims) == (LayerKind.CONV2D, 1, 2)
    assert (conv.in_features, conv.out_features) == (4, 6)


def test_a_decision_carries_a_blueprint_only_when_it_germinates() -> None:
    assert germinate("fc1", step=3).blueprint == MLP_H32
    assert decision("fc1", action=AdaptationAction.CULL).blueprint is None
    assert germinate("fc1").decision_id != germinate("fc1").decision_id  # distinct messages


def test_a_health_signal_takes_overrides_and_seeds() -> None:
    signal = health_signal("out", grad_norm=None, seeds=seeds_in([SeedState.ACTIVE]))

    assert (signal.layer_name, signal.grad_norm, signal.step) == ("out", None, 10)
    assert [s.state for s in signal.seeds] == [SeedState.ACTIVE]


def test_a_sized_artifact_has_the_size_and_the_id_it_claims() -> None:
    data, metadata = sized_artifact(5000, blueprint=MLP_H32, target=linear_target())

    assert len(data) == metadata.size_bytes == 5000
    assert hashlib.sha256(data).hexdigest() == metadata.kernel_id


def test_the_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock(10.0)
    clock.advance(2.5)

    assert clock() == clock() == 12.5
