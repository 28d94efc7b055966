"""``seeds.target`` in a run config selects layers by kind (``kind:<name>``), the form a YAML
file can write for layers whose class it cannot name; an unknown kind is refused by name."""

from __future__ import annotations

import pytest

from esper.errors import UnknownLayerError
from esper.tolaria.builders import build_data, build_model
from esper.tolaria.config import load_config

TRANSFORMER = ["data.name=digits", "host.kind=transformer", "growth.enabled=false"]


def test_a_kind_target_seeds_every_layer_of_that_kind() -> None:
    config = load_config(overrides=[*TRANSFORMER, "seeds.target=[kind:layer_norm, .head]"])
    data, _, _ = build_data(config)

    model = build_model(config, data)

    kinds = {name: model.layer(name).profile.kind for name in model.layer_names}
    assert set(kinds.values()) == {"layer_norm", "linear"}
    assert [name for name, kind in kinds.items() if kind == "linear"] == ["head"]
    assert len(kinds) == 1 + 1 + 2 * config.host.depth  # type: ignore[union-attr]  # norm, ln1, ln2
    model.kernel_cache.close()


def test_an_unknown_kind_target_is_refused_with_the_kinds_listed() -> None:
    config = load_config(overrides=[*TRANSFORMER, "seeds.target=[kind:layernorm]"])
    data, _, _ = build_data(config)

    with pytest.raises(UnknownLayerError, match=r"Did you mean 'kind:layer_norm'.*rms_norm"):
        build_model(config, data)
