"""Payload codec: contracts go into envelopes as JSON and come back as equal contracts."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from esper.contracts import (
    Contract,
    Envelope,
    HealthSignal,
    HealthSignalBatch,
    KernelReady,
    Topic,
)
from esper.errors import EsperError
from esper.oona import (
    PayloadDecodeError,
    UnknownPayloadTypeError,
    decode_payload,
    known_payload_types,
    make_envelope,
)


class ExperimentNote(Contract):
    """A contract that exists only in this test, so no registry knows it."""

    text: str


def test_health_signal_batch_survives_the_round_trip(
    health_signal: Callable[..., HealthSignal],
) -> None:
    batch = HealthSignalBatch(
        run_id="run-1", step=20, signals=(health_signal("fc1", 20), health_signal("fc2", 20))
    )
    envelope = make_envelope(Topic.TELEMETRY_HEALTH, batch, sender="tolaria", timestamp=12.5)
    # What a Redis consumer sees: the envelope rebuilt from its JSON.
    received = Envelope.model_validate_json(envelope.model_dump_json())

    decoded = decode_payload(received)

    assert received.payload_type == "HealthSignalBatch"
    assert received.timestamp == 12.5
    assert isinstance(decoded, HealthSignalBatch)
    assert decoded == batch
    assert decoded is not batch


def test_unknown_payload_type_is_rejected_with_the_known_types_listed() -> None:
    envelope = make_envelope("lab.notes", ExperimentNote(text="hi"), sender="me")

    with pytest.raises(UnknownPayloadTypeError) as caught:
        decode_payload(envelope)

    message = str(caught.value)
    assert "'ExperimentNote'" in message
    assert "HealthSignalBatch" in message
    assert "KernelReady" in message
    assert isinstance(caught.value, EsperError)
    assert isinstance(caught.value, LookupError)
    assert isinstance(caught.value, ValueError)


def test_an_expected_contract_decodes_types_outside_the_registry() -> None:
    envelope = make_envelope("lab.notes", ExperimentNote(text="hi"), sender="me")
    assert decode_payload(envelope, ExperimentNote) == ExperimentNote(text="hi")


def test_a_payload_of_another_type_than_expected_is_rejected(
    kernel_ready: Callable[[int], KernelReady],
) -> None:
    envelope = make_envelope(Topic.KERNEL_READY, kernel_ready(1), sender="me")
    with pytest.raises(UnknownPayloadTypeError, match="expected 'HealthSignalBatch'"):
        decode_payload(envelope, HealthSignalBatch)


def test_a_payload_from_a_newer_schema_is_rejected_naming_the_versions(
    kernel_ready: Callable[[int], KernelReady],
) -> None:
    envelope = make_envelope(Topic.KERNEL_READY, kernel_ready(1), sender="me")
    newer = envelope.model_copy(update={"payload": {**envelope.payload, "schema_version": 2}})
    with pytest.raises(PayloadDecodeError, match=r"schema version 2.*understands 1"):
        decode_payload(newer)


def test_registry_holds_the_exported_contracts_but_not_the_envelope() -> None:
    known = known_payload_types()
    assert known["HealthSignalBatch"] is HealthSignalBatch
    assert known["KernelReady"] is KernelReady
    assert "Envelope" not in known
    assert "Contract" not in known
    assert all(issubclass(contract, Contract) for contract in known.values())


def test_only_pydantic_contracts_can_be_wrapped() -> None:
    with pytest.raises(TypeError, match="Pydantic contracts"):
        make_envelope(Topic.KERNEL_READY, {"kernel_id": "x"}, sender="me")  # type: ignore[arg-type]
