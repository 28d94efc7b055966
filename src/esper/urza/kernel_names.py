"""Kernel names: how a name a person gives (an id, an id prefix, an alias) becomes one kernel id.

=======================  =====================================================================
``<64 hex digits>``       the kernel id itself (no lookup)
``<6-63 hex digits>``     the one stored kernel whose id starts with it; several: ambiguous
anything else             an alias (``kernel-001``); aliases always hold a non-hex character
=======================  =====================================================================

The three forms never overlap (see :mod:`esper.contracts.kernel_aliases`), so a name resolves to
at most one kernel, or fails naming the name. Every resolution that looked something up is
logged (logger ``esper.urza.kernel_names``, INFO).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from esper.contracts import KernelAlias
from esper.contracts.kernel_aliases import MIN_ID_PREFIX_CHARS, alias_problem, is_id_prefix
from esper.errors import AmbiguousKernelNameError, ConfigurationError, KernelNotFoundError

logger = logging.getLogger(__name__)

_KERNEL_ID = re.compile(r"[0-9a-f]{64}")


def check_kernel_name(name: object) -> str:
    """``name`` if it is a kernel id, an id prefix or a well-formed alias.

    Raises:
        ConfigurationError: anything else (the message says which forms are accepted).
    """
    if isinstance(name, str) and (is_id_prefix(name) or alias_problem(name) is None):
        return name
    shown = repr(name)[:80]
    why = alias_problem(name) if isinstance(name, str) else f"got {type(name).__name__}"
    raise ConfigurationError(
        f"kernel name {shown} is neither a kernel id (the sha256 of its artifact, 64 hex digits), "
        "an id prefix "
        f"(at least {MIN_ID_PREFIX_CHARS} of them) nor an alias: {why}"
    )


def check_alias_name(name: object) -> str:
    """``name`` if it can be an alias, else :class:`ConfigurationError` saying why not."""
    problem = alias_problem(name)
    if problem is not None:
        raise ConfigurationError(problem)
    assert isinstance(name, str)
    return name


def resolve_kernel_name(
    name: str,
    *,
    alias: Callable[[str], KernelAlias | None],
    ids_with_prefix: Callable[[str], list[str]],
    where: str,
) -> str:
    """The kernel id ``name`` stands for.

    Args:
        name: a kernel id, an id prefix, or an alias.
        alias: the stored alias of a name, or ``None``.
        ids_with_prefix: up to two stored ids starting with a prefix.
        where: the library, for messages.

    Raises:
        ConfigurationError: ``name`` has none of the three forms.
        KernelNotFoundError: no alias or no kernel id matches (the message names ``name``).
        AmbiguousKernelNameError: the prefix matches several kernels.
    """
    name = check_kernel_name(name)
    if _KERNEL_ID.fullmatch(name):
        return name
    if is_id_prefix(name):
        matches = ids_with_prefix(name)
        if not matches:
            raise KernelNotFoundError(f"no kernel id in {where} starts with {name!r}")
        if len(matches) > 1:
            raise AmbiguousKernelNameError(
                f"kernel id prefix {name!r} matches several kernels in {where} "
                f"({', '.join(m[:16] for m in matches)}, ...); give more digits of the id"
            )
        logger.info("kernel name %r (id prefix) resolved to %s in %s", name, matches[0], where)
        return matches[0]
    found = alias(name)
    if found is None:
        raise KernelNotFoundError(
            f"no kernel named {name!r} in {where}: it is not an alias there (`esper kernel "
            f"aliases` lists them; `esper kernel tag {name} <kernel id>` sets it)"
        )
    logger.info("kernel name %r (alias) resolved to %s in %s", name, found.kernel_id, where)
    return found.kernel_id
