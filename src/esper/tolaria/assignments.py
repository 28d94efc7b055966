"""``key=value`` assignments from the command line, read one way wherever they are taken.

``esper train … train.lr=3e-3 host.hidden=[16,16]`` (config overrides) and ``esper blueprint
submit --param rank=8 --param scale=1e-3`` (blueprint parameters) share the syntax: the text up to
the first ``=`` is the key, the rest is its value, read as YAML (:func:`load_yaml`: bounded, and
``3e-3`` is a number): ``2`` is an int, ``0.5`` and ``1e-3`` floats, ``true`` a bool, ``[16, 16]``
a list, ``relu`` (or ``'1e5'``, quoted) a string, and nothing after the ``=`` the empty string.
"""

from __future__ import annotations

from typing import Any

from esper.errors import ConfigurationError
from esper.tolaria.bounded_input import excerpt, load_yaml


def parse_assignment(text: str, *, what: str, example: str) -> tuple[str, Any]:
    """``"train.epochs=2"`` -> ``("train.epochs", 2)``.

    Args:
        text: the assignment.
        what: what it is, for errors (``override``, ``--param``).
        example: a well-formed one, for errors (``train.epochs=2``).

    Raises:
        ConfigurationError: no ``=``, an empty key, or a value that is not valid (bounded) YAML.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigurationError(f"{what} {excerpt(text)} is not key=value; write e.g. {example}")
    value = load_yaml(raw, source=f"{what} {excerpt(text)}") if raw.strip() else ""
    return key, value
