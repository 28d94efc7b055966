"""Renamed config keys: the old names a run config may still use, and what they are now.

A config key has the name of the concept it sets (the growth section's safety keys are the names
of :class:`~esper.contracts.safety.SafetyConfig`'s fields). A key that was renamed keeps loading
under its old name, converted and logged as deprecated, so older config files and the
``config.yaml`` of older run folders (``--resume``) still work; setting both names is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from esper.errors import ConfigurationError
from esper.tolaria.bounded_input import excerpt

logger = logging.getLogger(__name__)


def _same(value: Any, old: str) -> Any:
    return value


def _ratio_to_tolerance(value: Any, old: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(
            f"{old} must be a number (a ratio such as 1.5), got {excerpt(value)}; better, write "
            "growth.loss_spike_tolerance: 0.5 (the ratio minus 1)"
        )
    return value - 1.0


RENAMED_KEYS: dict[str, tuple[str, Callable[[Any, str], Any]]] = {
    "growth.max_seeds": ("growth.max_adaptations", _same),
    "growth.max_parameter_ratio": ("growth.max_parameter_fraction", _same),
    "growth.loss_spike_ratio": ("growth.loss_spike_tolerance", _ratio_to_tolerance),
}
"""Old config keys that still load: each one's current name and how its value converts (a loss
spike *ratio* of 1.5 is a *tolerance* of 0.5). The keys now have the names of the
:class:`~esper.contracts.safety.SafetyConfig` fields they set."""


def rename_old_keys(data: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """``data`` with every old key of :data:`RENAMED_KEYS` under its current name (each one
    logged as a deprecation warning naming the new key).

    Raises:
        ConfigurationError: ``data`` sets a key under both its old and its new name.
    """
    renamed = dict(data)
    for old, (new, convert) in RENAMED_KEYS.items():
        section, old_key = old.split(".")
        new_key = new.split(".")[1]
        values = renamed.get(section)
        if not isinstance(values, Mapping) or old_key not in values:
            continue
        if new_key in values:
            raise ConfigurationError(
                f"{source} sets both {old} and {new}; {old} is the old name of {new}: keep only "
                f"{new}"
            )
        values = dict(values)
        value = convert(values.pop(old_key), old)
        values[new_key] = value
        renamed[section] = values
        logger.warning(
            "%s: %s is now %s (%s: %s); the old name still loads but is deprecated, rename it",
            source,
            old,
            new,
            new,
            excerpt(value),
        )
    return renamed
