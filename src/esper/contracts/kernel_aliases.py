"""Kernel alias contracts: human-readable names of kernels (Urza's tags), and the name rules.

A kernel id is the sha256 of its artifact; people name kernels instead (``kernel-001``,
``mnist-adapter-v2``). An alias maps one name to one kernel id, like a git tag; it is set and
moved explicitly. An alias must contain a character that is not a lowercase hex digit, so no
alias can ever read as a kernel id or an id prefix and resolving a name is never ambiguous
between the two.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

from esper.contracts.base import Contract
from esper.contracts.bounds import Timestamp
from esper.contracts.kernels import KernelId

MAX_ALIAS_CHARS = 128
"""Longest alias name."""

MIN_ID_PREFIX_CHARS = 6
"""Shortest kernel-id prefix accepted where a kernel is named (shorter ones match too much)."""

ALIAS_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:+-]{{0,{MAX_ALIAS_CHARS - 1}}}")
"""Letters, digits and ``._:+-``, starting with a letter or digit (matched with ``fullmatch``)."""

_HEX = re.compile(r"[0-9a-f]+")


def alias_problem(name: object) -> str | None:
    """Why ``name`` cannot be an alias, or ``None`` when it can."""
    if not isinstance(name, str):
        return f"an alias must be a string, got {type(name).__name__}"
    if not ALIAS_PATTERN.fullmatch(name):
        return (
            f"alias {name[:80]!r} must be 1-{MAX_ALIAS_CHARS} letters, digits or '._:+-', "
            "starting with a letter or digit"
        )
    if _HEX.fullmatch(name):
        return (
            f"alias {name!r} is all lowercase hex digits, so it would read as a kernel id (or id "
            "prefix); add a letter or '-' (e.g. 'kernel-001')"
        )
    return None


def is_id_prefix(name: str) -> bool:
    """Whether ``name`` reads as a kernel-id prefix (lowercase hex, 6 to 64 digits)."""
    return MIN_ID_PREFIX_CHARS <= len(name) <= 64 and _HEX.fullmatch(name) is not None


def _check_alias(name: str) -> str:
    problem = alias_problem(name)
    if problem is not None:
        raise ValueError(problem)
    return name


AliasName = Annotated[str, AfterValidator(_check_alias)]
"""A valid alias name (see :func:`alias_problem`)."""


class KernelAlias(Contract):
    """One name of one kernel, as stored in the library.

    Attributes:
        name: the alias.
        kernel_id: the kernel it names now.
        updated_at: when it was set or last moved.
    """

    name: AliasName
    kernel_id: KernelId
    updated_at: Timestamp
