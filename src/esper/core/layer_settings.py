"""Per-layer seed settings: ``esper.wrap(..., layer_settings={"encoder.fc1": {...}})``.

Every seeded layer gets :func:`esper.wrap`'s own settings (``seeds_per_layer``, ``blend_steps``,
``max_retries``, ``retry_backoff_steps``, ``health_every``); ``layer_settings`` overrides some of
them for chosen layers. Its keys name layers as ``target_layers`` does by name: a dotted name
(``"encoder.fc1"``) or a ``.suffix`` (``".fc1"``: every seeded layer whose name ends with it).
Each key must match a seeded layer, each layer may be matched by one key only, and each setting
is checked like the argument of the same name, so a typo fails before the model is touched.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from esper.errors import ArgumentTypeError, ConfigurationError, UnknownLayerError
from esper.execution.arguments import check_seed_settings, shown

SETTING_NAMES = (
    "seeds_per_layer",
    "blend_steps",
    "max_retries",
    "retry_backoff_steps",
    "health_every",
)
"""What a layer's entry may set (the names of :func:`esper.wrap`'s arguments)."""


def check_layer_settings(
    layer_settings: object, defaults: Mapping[str, int]
) -> dict[str, dict[str, int]]:
    """The overrides of ``layer_settings`` by key, each merged over ``defaults`` and checked.

    Args:
        layer_settings: a mapping of layer name (or ``.suffix``) to a mapping of settings.
        defaults: :func:`esper.wrap`'s own settings, keyed by :data:`SETTING_NAMES`.

    Returns:
        Per key, the full :class:`~esper.execution.KasminaLayer` settings (``num_seeds``…).

    Raises:
        ArgumentTypeError: not a mapping of strings to mappings.
        ConfigurationError: an unknown setting (with a suggestion) or a value out of range.
    """
    if not isinstance(layer_settings, Mapping):
        raise ArgumentTypeError(
            f"layer_settings must map layer names to settings, got {shown(layer_settings)}"
        )
    checked: dict[str, dict[str, int]] = {}
    for key, given in layer_settings.items():
        if not isinstance(key, str) or not key.strip("."):
            raise ArgumentTypeError(f"layer_settings keys must be layer names, got {shown(key)}")
        if not isinstance(given, Mapping):
            raise ArgumentTypeError(
                f"layer_settings[{key!r}] must map setting names to values, got {shown(given)}"
            )
        for setting in given:
            if setting not in SETTING_NAMES:
                close = difflib.get_close_matches(str(setting), SETTING_NAMES, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigurationError(
                    f"layer_settings[{key!r}] has unknown setting {shown(setting)}.{hint} "
                    f"Settings: {', '.join(SETTING_NAMES)}"
                )
        merged: dict[str, Any] = {**defaults, **given}
        settings = check_seed_settings(
            num_seeds=merged["seeds_per_layer"],
            blend_steps=merged["blend_steps"],
            max_retries=merged["max_retries"],
            retry_backoff_steps=merged["retry_backoff_steps"],
            health_every=merged["health_every"],
            where=f"layer_settings[{key!r}]['seeds_per_layer']",
        )
        checked[key] = settings
    return checked


def settings_for_layers(
    layers: Sequence[Sequence[str]],
    overrides: Mapping[str, dict[str, int]],
    defaults: dict[str, int],
) -> list[dict[str, int]]:
    """The settings of each layer (given by all the names it goes by), in order.

    Raises:
        UnknownLayerError: a key matches no layer (with suggestions).
        ConfigurationError: two keys match the same layer.
    """
    used: set[str] = set()
    result = []
    for names in layers:
        keys = [key for key in overrides if any(_matches(key, name) for name in names)]
        if len(keys) > 1:
            raise ConfigurationError(
                f"layer {names[0]!r} is matched by several layer_settings keys "
                f"({', '.join(map(repr, keys))}); give it one entry"
            )
        used.update(keys)
        result.append(overrides[keys[0]] if keys else defaults)
    unused = [key for key in overrides if key not in used]
    if unused:
        every = [name for names in layers for name in names]
        close = difflib.get_close_matches(unused[0].lstrip("."), every, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownLayerError(
            f"layer_settings key {unused[0]!r} names no seeded layer.{hint} Seeded layers: "
            f"{', '.join(every) or 'none'}"
        )
    return result


def _matches(key: str, name: str) -> bool:
    return key == name or (key.startswith(".") and f".{name}".endswith(key))
