"""Oona's errors: the bus cannot be reached, or a message payload cannot be decoded."""

from __future__ import annotations

from esper.errors import EsperError


class BusUnavailableError(EsperError):
    """The message bus cannot be reached (server down, connection refused or timed out, closed).

    Raised by a bus backend's ``publish``/``poll``/``ack``; a :class:`BackgroundPublisher` catches
    it, counts the message as dropped and retries the connection with backoff.
    """


class PayloadDecodeError(EsperError, ValueError):
    """An envelope's payload does not validate against the contract its ``payload_type`` names."""


class UnknownPayloadTypeError(PayloadDecodeError, LookupError):
    """An envelope's ``payload_type`` names no contract this process knows how to decode."""
