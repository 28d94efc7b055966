"""Pages of list results: the ``limit``/``offset`` bounds shared by the library, service and client.

Every list (blueprints, kernels found, compile jobs) is ordered oldest first, so paging with a
growing ``offset`` sees rows added meanwhile at the end, never twice. An embedded library returns
everything when ``limit`` is ``None``; the service never answers more than :data:`MAX_PAGE_SIZE`
rows at once, and :class:`~esper.urza.http_client.HttpUrza` asks page after page when it is
given no ``limit``.
"""

from __future__ import annotations

from esper.errors import ConfigurationError

MAX_PAGE_SIZE = 1000
"""Most rows one request to the service returns (and the largest ``limit`` accepted anywhere)."""

MAX_OFFSET = 2**62
"""Largest ``offset`` (it must fit the databases' 64-bit ``OFFSET``)."""


def check_page(limit: int | None, offset: int) -> tuple[int | None, int]:
    """``(limit, offset)`` if they are a valid page, else :class:`ConfigurationError`.

    Args:
        limit: rows to return, 1 to :data:`MAX_PAGE_SIZE`; ``None``: all of them.
        offset: rows to skip first, 0 to :data:`MAX_OFFSET`.
    """
    if limit is not None and (type(limit) is not int or not 1 <= limit <= MAX_PAGE_SIZE):
        raise ConfigurationError(
            f"limit must be an integer from 1 to {MAX_PAGE_SIZE} (or None for every row), "
            f"got {limit!r:.40}."
        )
    if type(offset) is not int or not 0 <= offset <= MAX_OFFSET:
        raise ConfigurationError(
            f"offset must be an integer from 0 to {MAX_OFFSET}, got {offset!r:.40}."
        )
    return limit, offset
