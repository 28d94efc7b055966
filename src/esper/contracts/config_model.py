"""Config models: frozen settings objects whose bad fields raise one :class:`ConfigurationError`.

A settings object (safety thresholds, an episode schedule, PPO hyperparameters) states the range
of each field once, as a Pydantic constraint, instead of checking it by hand in ``__post_init__``;
every field that is wrong is named in one error, with the value given and what was expected::

    SafetyConfig(min_confidence=1.5, cooldown_steps=-1)
    # ConfigurationError: invalid SafetyConfig: min_confidence=1.5 (input should be less than or
    # equal to 1); cooldown_steps=-1 (input should be greater than or equal to 0). Fix these fields.
"""

from __future__ import annotations

import difflib
import reprlib
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from esper.contracts.bounds import text_within_bounds
from esper.errors import ConfigurationError

MAX_LISTED_FIELDS = 10
"""Bad fields listed in one error (then a count of the others)."""


class ConfigModel(BaseModel):
    """A frozen settings object: unknown fields and values out of range are a
    :class:`ConfigurationError` naming each one (not Pydantic's ``ValidationError``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise ConfigurationError(describe_invalid(type(self), error)) from None

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Any:
        """Validate ``obj`` (a mapping or a model) as this class; errors as in the constructor."""
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as error:
            raise ConfigurationError(describe_invalid(cls, error)) from None


def describe_invalid(model: type[BaseModel], error: ValidationError) -> str:
    """``invalid <Model>: field=value (what was wrong); …. Fix these fields.``

    An unknown field is answered with the closest valid one (``Did you mean 'cooldown_steps'?``).
    """
    name = model.__name__
    problems = []
    errors = error.errors(include_url=False)
    for item in errors[:MAX_LISTED_FIELDS]:
        field = ".".join(str(part) for part in item["loc"])
        message = str(item["msg"]).removeprefix("Value error, ")
        message = message[0].lower() + message[1:] if message else message
        if not field:  # a check of several fields together (a model validator)
            problems.append(message)
        elif item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(field[:100], list(model.model_fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown field {reprlib.repr(field)}{hint}")
        elif item["type"] == "missing":
            problems.append(f"{field} is required")
        else:
            problems.append(f"{field}={reprlib.repr(item.get('input'))} ({message})")
    if len(errors) > MAX_LISTED_FIELDS:
        problems.append(f"... and {len(errors) - MAX_LISTED_FIELDS} more")
    return text_within_bounds(
        f"invalid {name}: {'; '.join(problems)}. Fix these fields.", limit=2000
    )
