"""Argument parsing for the ``esper`` commands: one-line errors and value types that check ranges.

A bad argument is answered the way every other user mistake is, with one line and exit status 2
(``error: argument --port: expected an integer from 1 to 65535, got '99999'``), instead of
argparse's usage block; ``--help`` shows the usage. The value types refuse out-of-range numbers
(``--nproc 0``, ``--epochs -1``, ``--cycle-ms nan``) while the command line is parsed, before
anything is imported, built or written.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import Annotated, Any, NoReturn

from pydantic import BaseModel, TypeAdapter, ValidationError

from esper.errors import EsperError
from esper.tolaria.bounded_input import clip, excerpt
from esper.tolaria.config import RUN_ID_PATTERN

MAX_PORT = 65535


class CommandLineError(EsperError):
    """An argument the parser refused (unknown option, missing value, value out of range)."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose errors are a :class:`CommandLineError`.

    The command's entry point prints the error as one line and returns 2 (argparse would print
    the usage block and exit). Sub-command parsers are of the same class.
    """

    def error(self, message: str) -> NoReturn:
        """Raise the parse error (named after the command, pointing at its ``--help``)."""
        raise CommandLineError(f"{self.prog}: {clip(message, limit=300)} (see {self.prog} --help)")


def integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[minimum, maximum]`` (no upper bound when ``None``)."""
    expected = (
        f"an integer >= {minimum}"
        if maximum is None
        else (f"an integer from {minimum} to {maximum}")
    )

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {excerpt(text)}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {excerpt(text)}")
        return value

    parse.__name__ = expected
    return parse


def number(
    minimum: float = -math.inf,
    maximum: float = math.inf,
    *,
    inclusive_minimum: bool = True,
) -> Callable[[str], float]:
    """An argparse type: a finite float in the given range (``nan``/``inf`` are refused)."""
    low = ">=" if inclusive_minimum else ">"
    parts = [f"{low} {minimum:g}" if math.isfinite(minimum) else "", ""]
    if math.isfinite(maximum):
        parts[1] = f"<= {maximum:g}"
    expected = "a finite number " + " and ".join(p for p in parts if p)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {excerpt(text)}") from None
        too_low = value < minimum if inclusive_minimum else value <= minimum
        if not math.isfinite(value) or too_low or value > maximum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {excerpt(text)}")
        return value

    parse.__name__ = expected.strip()
    return parse


def run_id(text: str) -> str:
    """An argparse type: a run id (letters, digits, ``_.-``; not hidden, not ``..``)."""
    if not re.fullmatch(RUN_ID_PATTERN, text):
        raise argparse.ArgumentTypeError(
            f"expected a run id (up to 100 letters, digits, '_', '.' or '-', not starting with "
            f"'.' or '-'), got {excerpt(text)}"
        )
    return text


def setting(model: type[BaseModel], field: str) -> Callable[[str], Any]:
    """An argparse type: a value of ``model``'s ``field``, checked against the field's own type
    and range (so a flag that sets a config field never states the range a second time).

    Example: ``--min-confidence`` takes ``setting(SafetyConfig, "min_confidence")``, a number in
    [0, 1]; ``2`` is answered ``input should be less than or equal to 1, got '2'``.
    """
    info = model.model_fields[field]
    field_type: Any = (
        Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
    )
    adapter: TypeAdapter[Any] = TypeAdapter(field_type)

    def parse(text: str) -> Any:
        try:
            return adapter.validate_python(text)
        except ValidationError as error:
            message = str(error.errors(include_url=False)[0]["msg"])
            problem = message[0].lower() + message[1:]
            raise argparse.ArgumentTypeError(f"{problem}, got {excerpt(text)}") from None

    parse.__name__ = f"{model.__name__}.{field}"
    return parse


positive_int = integer(1)
port_number = integer(1, MAX_PORT)
positive_number = number(0.0, inclusive_minimum=False)
