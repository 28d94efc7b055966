"""Payload codec: wrap a contract into an :class:`Envelope` and decode an envelope's payload back.

A message crosses the bus as JSON: ``payload`` is ``message.model_dump(mode="json")`` and
``payload_type`` is the contract's class name. Decoding looks that name up among the contracts
exported by :mod:`esper.contracts`; a name it does not know is rejected rather than guessed at.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType
from typing import TypeVar, overload

from pydantic import BaseModel, ValidationError

import esper.contracts
from esper.contracts import Contract, Envelope, Topic
from esper.oona.errors import PayloadDecodeError, UnknownPayloadTypeError

ContractT = TypeVar("ContractT", bound=Contract)


def make_envelope(
    topic: Topic | str,
    message: Contract,
    *,
    sender: str,
    trace_id: str | None = None,
    timestamp: float | None = None,
) -> Envelope:
    """Wrap ``message`` into an envelope for ``topic``.

    Args:
        topic: the topic the message is published on, e.g. ``Topic.TELEMETRY_HEALTH``.
        message: the contract to carry; serialized with ``model_dump(mode="json")``.
        sender: who publishes it, e.g. ``"tolaria@host:1234"``.
        trace_id: ties related messages together (a new random id when omitted).
        timestamp: Unix time of the event (now when omitted).

    Returns:
        A validated envelope whose ``payload_type`` is the class name of ``message``.
    """
    if not isinstance(message, BaseModel):
        raise TypeError(
            f"Oona publishes Pydantic contracts, got {type(message).__name__}; "
            "wrap the data in a model from esper.contracts."
        )
    fields: dict[str, object] = {
        "topic": str(topic),
        "sender": sender,
        "payload_type": type(message).__name__,
        "payload": message.model_dump(mode="json"),
    }
    if trace_id is not None:
        fields["trace_id"] = trace_id
    if timestamp is not None:
        fields["timestamp"] = timestamp
    return Envelope.model_validate(fields)


@functools.cache
def known_payload_types() -> Mapping[str, type[Contract]]:
    """The contracts a payload can be decoded into, by class name.

    Every :class:`Contract` subclass exported by :mod:`esper.contracts` except :class:`Envelope`.
    """
    found: dict[str, type[Contract]] = {}
    for name in esper.contracts.__all__:
        candidate = getattr(esper.contracts, name)
        if (
            isinstance(candidate, type)
            and issubclass(candidate, Contract)
            and candidate not in (Contract, Envelope)
        ):
            found[candidate.__name__] = candidate
    return MappingProxyType(found)


@overload
def decode_payload(envelope: Envelope) -> Contract: ...


@overload
def decode_payload(envelope: Envelope, expected: type[ContractT]) -> ContractT: ...


def decode_payload(envelope: Envelope, expected: type[Contract] | None = None) -> Contract:
    """Turn an envelope's payload back into the contract its ``payload_type`` names.

    Args:
        envelope: a message received from the bus.
        expected: the contract the caller expects. When given, the envelope must carry exactly
            this type (it need not be exported by :mod:`esper.contracts`).

    Returns:
        A freshly validated contract instance (independent of ``envelope.payload``).

    Raises:
        UnknownPayloadTypeError: ``payload_type`` is not a known contract, or is not ``expected``.
        PayloadDecodeError: the payload does not validate against its contract (for example, it
            was written with a newer ``schema_version``).
    """
    if expected is not None:
        if envelope.payload_type != expected.__name__:
            raise UnknownPayloadTypeError(
                f"envelope {envelope.event_id} on topic {envelope.topic!r} carries "
                f"{envelope.payload_type!r}, expected {expected.__name__!r}; "
                "check which topic this consumer subscribed to."
            )
        contract = expected
    else:
        known = known_payload_types()
        if envelope.payload_type not in known:
            raise UnknownPayloadTypeError(
                f"envelope {envelope.event_id} on topic {envelope.topic!r} carries unknown "
                f"payload type {envelope.payload_type!r}; known types: {', '.join(sorted(known))}. "
                "Upgrade this consumer, or pass the contract class as `expected`."
            )
        contract = known[envelope.payload_type]
    try:
        return contract.model_validate(envelope.payload)
    except ValidationError as exc:
        raise PayloadDecodeError(
            f"envelope {envelope.event_id} on topic {envelope.topic!r}: payload does not validate "
            f"as {contract.__name__} (schema version {envelope.payload.get('schema_version')!r}, "
            f"this process understands {contract.model_fields['schema_version'].default!r}): "
            f"{exc.error_count()} error(s), first: {exc.errors()[0]['msg']} at "
            f"{'.'.join(str(part) for part in exc.errors()[0]['loc']) or '<root>'}"
        ) from exc
