"""Per-layer settings: ``wrap(..., layer_settings={...})`` overrides seeds and ramps per layer,
matches names like ``target_layers`` does, and refuses typos before touching the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import esper
from esper.errors import ArgumentTypeError, ConfigurationError, UnknownLayerError
from esper.execution import InMemoryArtifactSource


def _model() -> nn.Module:
    torch.manual_seed(0)
    encoder = nn.Sequential()
    encoder.add_module("fc1", nn.Linear(4, 8))
    encoder.add_module("fc2", nn.Linear(8, 8))
    decoder = nn.Sequential()
    decoder.add_module("fc1", nn.Linear(8, 4))
    return nn.Sequential(encoder, decoder)


def _wrap(model: nn.Module, **kwargs: object) -> esper.MorphableModel:
    source = InMemoryArtifactSource()
    return esper.wrap(model, kernel_source=source, **kwargs)  # type: ignore[arg-type]


def test_named_and_suffix_keys_override_the_defaults_of_their_layers() -> None:
    model = _wrap(
        _model(),
        seeds_per_layer=2,
        blend_steps=20,
        layer_settings={
            "0.fc2": {"seeds_per_layer": 5, "blend_steps": 3},
            ".1.fc1": {"health_every": 0},
        },
    )

    assert [model.layer(n).num_seeds for n in ("0.fc1", "0.fc2", "1.fc1")] == [2, 5, 2]
    assert [model.layer(n).blend_steps for n in ("0.fc1", "0.fc2", "1.fc1")] == [20, 3, 20]
    assert model.layer("1.fc1").health_every == 0 and model.layer("0.fc1").health_every == 10


def test_a_suffix_key_reaches_every_layer_ending_with_it() -> None:
    model = _wrap(_model(), seeds_per_layer=1, layer_settings={".fc1": {"max_retries": 0}})

    assert model.layer("0.fc1").max_retries == model.layer("1.fc1").max_retries == 0
    assert model.layer("0.fc2").max_retries == 3


def test_settings_per_layer_still_compute_exactly_the_original() -> None:
    plain = _model()
    x = torch.randn(3, 4)
    model = _wrap(plain, layer_settings={"0.fc1": {"seeds_per_layer": 7}})

    assert torch.equal(model(x), plain(x))


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"0.fc9": {"blend_steps": 2}}, UnknownLayerError, "Did you mean '0.fc2', '0.fc1'"),
        ({"0.fc1": {"blend_step": 2}}, ConfigurationError, "Did you mean 'blend_steps'"),
        ({"0.fc1": {"seeds_per_layer": 0}}, ConfigurationError, r"layer_settings\['0.fc1'\]"),
        ({"0.fc1": {"blend_steps": True}}, ArgumentTypeError, "blend_steps"),
        ({"0.fc1": {}, ".fc1": {}}, ConfigurationError, "several layer_settings keys"),
        ({"0.fc1": 3}, ArgumentTypeError, "must map setting names"),
        (["0.fc1"], ArgumentTypeError, "must map layer names"),
    ],
)
def test_bad_settings_fail_clearly_and_change_nothing(
    settings: object, error: type[Exception], match: str
) -> None:
    model = _model()
    before = {name: type(module) for name, module in model.named_modules()}

    with pytest.raises(error, match=match):
        _wrap(model, inplace=True, layer_settings=settings)

    assert {name: type(module) for name, module in model.named_modules()} == before
