"""Bus URLs: :func:`open_bus` picks the message-bus backend from a URL's scheme.

========================================  ==============================================
URL                                       backend
========================================  ==============================================
``memory://``                             a new :class:`InProcessBus` (zero setup)
``redis://host:port/db``                  :class:`RedisStreamsBus` (needs ``esper[redis]``)
``rediss://host:port/db``                 the same over TLS
========================================  ==============================================

Query parameters set bus options: ``max_len`` for both backends, ``stream_prefix`` for Redis,
e.g. ``redis://127.0.0.1:6379/0?stream_prefix=run42&max_len=50000``; other Redis query parameters
are passed on to redis-py. Redis support is imported only when a ``redis://`` URL is opened.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from esper.errors import ConfigurationError
from esper.oona.bus import DEFAULT_MAX_LEN, MessageBus
from esper.oona.in_process import InProcessBus

ACCEPTED_SCHEMES = ("memory", "redis", "rediss")


def open_bus(
    url: str = "memory://",
    *,
    sender: str | None = None,
    stream_prefix: str | None = None,
    max_len: int | None = None,
) -> MessageBus:
    """Open the message bus that ``url`` names.

    Args:
        url: ``memory://`` or ``redis://host:port/db`` (see the module docstring for options).
            Each ``memory://`` call returns a new, private bus: components in one process share
            a bus by sharing the returned object.
        sender: the ``sender`` written into published envelopes (default: ``host:pid``).
        stream_prefix: Redis stream-key prefix; overrides the URL's ``stream_prefix``.
        max_len: messages retained per topic; overrides the URL's ``max_len``.

    Returns:
        A :class:`MessageBus`.

    Raises:
        ConfigurationError: the scheme is not one of ``memory``, ``redis``, ``rediss``, or an
            option is malformed.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ACCEPTED_SCHEMES:
        accepted = ", ".join(f"{name}://" for name in ACCEPTED_SCHEMES)
        raise ConfigurationError(
            f"unknown message-bus URL {url!r}: scheme {parts.scheme or '(none)'!r} is not "
            f"supported; use one of {accepted} (e.g. memory:// or redis://127.0.0.1:6379/0)."
        )
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    url_max_len = query.pop("max_len", None)
    url_stream_prefix = query.pop("stream_prefix", None)
    if max_len is None:
        max_len = DEFAULT_MAX_LEN if url_max_len is None else _parse_positive_int(url_max_len, url)
    if scheme == "memory":
        if query or url_stream_prefix is not None:
            unknown = sorted([*query, *([] if url_stream_prefix is None else ["stream_prefix"])])
            raise ConfigurationError(
                f"memory:// bus URL {url!r} has unsupported options {unknown}; "
                "only max_len is accepted."
            )
        return InProcessBus(sender=sender, max_len=max_len)

    from esper.oona.redis_streams import DEFAULT_STREAM_PREFIX, RedisStreamsBus

    redis_url = urlunsplit(parts._replace(query=urlencode(query)))
    try:
        return RedisStreamsBus(
            redis_url,
            sender=sender,
            stream_prefix=stream_prefix or url_stream_prefix or DEFAULT_STREAM_PREFIX,
            max_len=max_len,
        )
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigurationError):
            raise
        raise ConfigurationError(f"invalid Redis bus URL {url!r}: {exc}") from exc


def _parse_positive_int(text: str, url: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigurationError(
            f"bus URL {url!r}: max_len must be a positive integer, got {text!r}."
        )
    return value
