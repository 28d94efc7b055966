"""Oona: the message bus that carries telemetry and commands between Esper's components.

One interface, :class:`MessageBus`, with two backends chosen by URL through :func:`open_bus`:
``memory://`` (:class:`InProcessBus`, the zero-setup default) and ``redis://host:port/db``
(:class:`RedisStreamsBus`, consumer groups on Redis Streams). Messages are contracts from
:mod:`esper.contracts`, carried in an :class:`~esper.contracts.Envelope` and decoded back with
:func:`decode_payload`. The training side publishes through :class:`BackgroundPublisher` /
:class:`OonaTelemetrySink`, which never block and never raise.

Importing this package does not import ``redis``; it is imported when a Redis bus is opened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from esper.oona.backends import ACCEPTED_SCHEMES, open_bus
from esper.oona.background_publisher import BackgroundPublisher, PublisherCounters
from esper.oona.background_subscriber import BackgroundSubscriber
from esper.oona.bus import DEFAULT_MAX_LEN, Delivery, GroupStart, MessageBus, Subscription
from esper.oona.errors import BusUnavailableError, PayloadDecodeError, UnknownPayloadTypeError
from esper.oona.in_process import InProcessBus, InProcessSubscription
from esper.oona.payloads import decode_payload, known_payload_types, make_envelope
from esper.oona.telemetry_sink import OonaTelemetrySink

if TYPE_CHECKING:
    from esper.oona.redis_streams import RedisStreamsBus, RedisSubscription

__all__ = [
    "ACCEPTED_SCHEMES",
    "DEFAULT_MAX_LEN",
    "BackgroundPublisher",
    "BackgroundSubscriber",
    "BusUnavailableError",
    "Delivery",
    "GroupStart",
    "InProcessBus",
    "InProcessSubscription",
    "MessageBus",
    "OonaTelemetrySink",
    "PayloadDecodeError",
    "PublisherCounters",
    "RedisStreamsBus",
    "RedisSubscription",
    "Subscription",
    "UnknownPayloadTypeError",
    "decode_payload",
    "known_payload_types",
    "make_envelope",
    "open_bus",
]

_REDIS_NAMES = frozenset({"RedisStreamsBus", "RedisSubscription"})


def __getattr__(name: str) -> Any:
    """Import the Redis backend on first use of one of its names (it needs ``redis``)."""
    if name in _REDIS_NAMES:
        from esper.oona import redis_streams

        return getattr(redis_streams, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
