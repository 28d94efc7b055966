"""Argument checks at the public boundary: one clear error per bad value, before anything changes.

Python lets ``True`` pass for an ``int`` and ``2.5`` compare with one, so ``seed_idx=True`` or
``seeds_per_layer=2.5`` would otherwise slip through and corrupt state later (a state-dict key
``seeds.True``, a seed half-unloaded). Every public entry point of the execution layer, of
:func:`esper.wrap` and of :class:`~esper.core.MorphableModel` checks its arguments here first:
a wrong type raises :class:`~esper.errors.ArgumentTypeError` (a ``TypeError``), a value out of
range :class:`~esper.errors.ConfigurationError` (a ``ValueError``), a bad seed index
:class:`~esper.errors.SeedIndexError` (an ``IndexError``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from esper.errors import ArgumentTypeError, ConfigurationError, SeedIndexError

MAX_SEEDS_PER_LAYER = 64
"""Most seeds one layer may carry. Each seed costs device buffers and a host mirror, and every
telemetry flush reads 3 values per seed; no growth schedule needs more than a handful."""

MAX_STEP_SETTING = 2**31 - 1
"""Upper bound of step counts (blend steps, retry backoff, health period): the device keeps them
as int32."""

MAX_RETRIES = 32
"""Most faults a seed may tolerate: the retry backoff doubles after each one."""


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: user input in a message stays bounded."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_integer(value: object) -> bool:
    """Whether ``value`` is an integer (Python or NumPy) and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: object, *, minimum: int, maximum: int) -> int:
    """``value`` as an ``int`` if it is an integer within ``minimum..maximum``.

    Raises:
        ArgumentTypeError: not an integer (bools and floats included).
        ConfigurationError: out of range.
    """
    if not is_integer(value):
        raise ArgumentTypeError(
            f"{name} must be an integer, got {shown(value)} ({type(value).__name__})"
        )
    number = int(value)  # type: ignore[call-overload]
    if not minimum <= number <= maximum:
        raise ConfigurationError(f"{name} must be within {minimum}..{maximum}, got {number}")
    return number


def check_seed_index(value: object, *, num_seeds: int, layer_name: str) -> int:
    """``value`` as an ``int`` if it indexes one of a layer's ``num_seeds`` seeds.

    Raises:
        SeedIndexError: not an integer (a bool included) or out of range.
    """
    if is_integer(value) and 0 <= int(value) < num_seeds:  # type: ignore[call-overload]
        return int(value)  # type: ignore[call-overload]
    problem = "is out of range" if is_integer(value) else "is not an integer"
    raise SeedIndexError(
        f"seed index {shown(value)} {problem} for layer {layer_name!r}, which has {num_seeds} "
        f"seeds (valid: 0..{num_seeds - 1})"
    )


def check_alpha(value: object) -> float:
    """``value`` as a ``float`` if it is a real number within ``[0, 1]``.

    Raises:
        ArgumentTypeError: not a real number (bools and strings included).
        ConfigurationError: NaN or outside ``[0, 1]``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(
            f"alpha must be a number within [0, 1], got {shown(value)} ({type(value).__name__})"
        )
    alpha = float(value)
    if not 0.0 <= alpha <= 1.0:  # NaN fails too
        raise ConfigurationError(f"alpha must be within [0, 1], got {alpha}")
    return alpha


def check_timeout(value: object) -> float | None:
    """``value`` as seconds (``None``: wait forever) if it is a positive, finite number.

    Raises:
        ArgumentTypeError: neither ``None`` nor a real number.
        ConfigurationError: not positive and finite.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(
            f"timeout must be a number of seconds or None, got {shown(value)} "
            f"({type(value).__name__})"
        )
    seconds = float(value)
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ConfigurationError(f"timeout must be a positive number of seconds, got {seconds}")
    return seconds


def check_name(what: str, value: object) -> str:
    """``value`` if it is a string (a layer name, a dotted module path).

    Raises:
        ArgumentTypeError: not a string.
    """
    if not isinstance(value, str):
        raise ArgumentTypeError(
            f"{what} must be a string, got {shown(value)} ({type(value).__name__})"
        )
    return value


def check_has_method(what: str, value: object, method: str) -> None:
    """Raise :class:`ArgumentTypeError` unless ``value`` has a callable ``method``."""
    if not callable(getattr(value, method, None)):
        raise ArgumentTypeError(
            f"{what} must have a {method}() method, got {shown(value)} ({type(value).__name__})"
        )


def check_seed_settings(
    *,
    num_seeds: object,
    blend_steps: object,
    max_retries: object,
    retry_backoff_steps: object,
    health_every: object,
    where: str = "seeds_per_layer",
) -> dict[str, Any]:
    """The seed settings shared by :func:`esper.wrap` and :class:`KasminaLayer`, checked.

    Args:
        num_seeds: seeds per layer, ``1..MAX_SEEDS_PER_LAYER``.
        blend_steps: alpha ramp length, ``1..MAX_STEP_SETTING``.
        max_retries: faults tolerated per seed, ``0..MAX_RETRIES``.
        retry_backoff_steps: steps before the first retry, ``1..MAX_STEP_SETTING``.
        health_every: health sampling period, ``0`` (never) ``..MAX_STEP_SETTING``.
        where: the name the seed count goes by in messages (``seeds_per_layer``/``num_seeds``).

    Returns:
        The settings as plain ``int`` values, keyed by the argument names above.
    """
    return {
        "num_seeds": check_int(where, num_seeds, minimum=1, maximum=MAX_SEEDS_PER_LAYER),
        "blend_steps": check_int("blend_steps", blend_steps, minimum=1, maximum=MAX_STEP_SETTING),
        "max_retries": check_int("max_retries", max_retries, minimum=0, maximum=MAX_RETRIES),
        "retry_backoff_steps": check_int(
            "retry_backoff_steps", retry_backoff_steps, minimum=1, maximum=MAX_STEP_SETTING
        ),
        "health_every": check_int(
            "health_every", health_every, minimum=0, maximum=MAX_STEP_SETTING
        ),
    }
