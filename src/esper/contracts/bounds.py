"""Bounds of contract fields: the ranges every integer, float and string crossing a boundary fits.

A contract is the first thing that sees a value from outside (an HTTP body, a bus message, a
stored row), so its fields carry the limits that every consumer relies on: integers fit the
64-bit (or, for layer geometry, 32-bit) columns of the library's database and describe a sane
model, floats are finite where a non-finite value means nothing, and strings are bounded and
free of NUL characters (PostgreSQL's text columns cannot hold them). A value outside a bound is
refused with a validation error naming the field, instead of failing later in a database, a
tensor allocation or a log line.
"""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import AfterValidator, Field, StringConstraints

MAX_INT64 = 2**63 - 1
"""Largest value of a signed 64-bit integer (PostgreSQL ``BIGINT``)."""

MAX_FEATURES = 2**24
"""Largest channel count of a layer a kernel is built for (16,777,216)."""

MAX_PARAMETERS = 2**40
"""Largest parameter count a contract describes (far above any kernel or host served here)."""

MAX_ARTIFACT_BYTES = 2**40
"""Largest artifact size a contract describes (1 TiB; the service's own limit is far lower)."""

MAX_STEP = 2**53
"""Largest training step (exactly representable as a float, as JSON readers need)."""

MAX_SEEDS_PER_LAYER = 1024
"""Largest seed index + 1 of a layer."""

MAX_NAME_CHARS = 200
"""Longest name: run ids, worker ids, blueprint names, policies, senders."""

MAX_LAYER_NAME_CHARS = 1000
"""Longest layer name (a dotted module path)."""

MAX_TEXT_CHARS = 20_000
"""Longest free text: reasons and error messages (longer ones are cut by their producer)."""

MAX_PARAM_INT = 2**53
"""Largest magnitude of an integer blueprint hyperparameter (exact in every JSON reader)."""

MAX_PARAM_STR_CHARS = 200
"""Longest string blueprint hyperparameter."""

MAX_BLUEPRINT_PARAMS = 32
"""Most hyperparameters of one blueprint spec."""

_NO_NUL = r"^[^\x00]*$"

Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_CHARS, pattern=_NO_NUL)]
"""A non-empty name of at most :data:`MAX_NAME_CHARS` characters, without NUL."""

LayerName = Annotated[str, StringConstraints(max_length=MAX_LAYER_NAME_CHARS, pattern=_NO_NUL)]
"""A layer's module path (``""`` for a model that is itself the layer)."""

Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS, pattern=_NO_NUL)]
"""Free text (a reason, an error message) of at most :data:`MAX_TEXT_CHARS` characters."""

DtypeName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9]{0,31}$")]
"""A dtype's contract name, e.g. ``float32`` or ``bfloat16``."""

DeviceName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}(:[0-9]{1,4})?$")]
"""A torch device string, e.g. ``cpu``, ``cuda:0``, ``mps``."""

Step = Annotated[int, Field(ge=0, le=MAX_STEP)]
"""A training step."""

Count = Annotated[int, Field(ge=0, le=MAX_INT64)]
"""A non-negative count that fits a 64-bit column."""

ParameterCount = Annotated[int, Field(ge=0, le=MAX_PARAMETERS)]
"""A number of parameters (or tensor elements)."""

InitSeed = Annotated[int, Field(ge=0, le=MAX_INT64)]
"""Seed of a kernel's initialisation (a non-negative 64-bit integer)."""

Timestamp = Annotated[float, Field(ge=0, allow_inf_nan=False)]
"""Seconds since the epoch."""

Features = Annotated[int, Field(gt=0, le=MAX_FEATURES)]
"""A layer's channel count."""


def text_within_bounds(text: str, *, limit: int = MAX_TEXT_CHARS) -> str:
    """``text`` made to fit a :data:`Text` field: NUL characters shown as ``\\x00``, cut to
    ``limit`` characters with a marker saying how much was cut.

    Producers of free text they do not control (an exception's message) call this so that
    recording the text can never fail.
    """
    text = text.replace("\x00", "\\x00")
    if len(text) <= limit:
        return text
    marker = f" ... [{len(text) - limit} more characters cut]"
    return text[: max(0, limit - len(marker))] + marker


def check_param_value(value: int | float | str | bool) -> int | float | str | bool:
    """Refuse a blueprint hyperparameter outside its bounds (a non-finite float, a huge int, a
    long string or one with NUL); return it unchanged otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and abs(value) > MAX_PARAM_INT:
        raise ValueError(f"integer hyperparameters must be within +-2**53, got {value:.3e}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"float hyperparameters must be finite, got {value}")
    if isinstance(value, str) and (len(value) > MAX_PARAM_STR_CHARS or "\x00" in value):
        raise ValueError(
            f"string hyperparameters must be at most {MAX_PARAM_STR_CHARS} characters without "
            f"NUL, got {len(value)} characters"
        )
    return value


ParamValue = Annotated[int | float | str | bool, AfterValidator(check_param_value)]
"""A blueprint hyperparameter: a bounded int, a finite float, a short string, or a bool.

The bound is checked after the union picked the value's type, so an integer stays an integer
(a spec's JSON, and so its id, never changes by validation)."""

ParamName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
"""A hyperparameter's name (an identifier of at most 64 characters)."""
