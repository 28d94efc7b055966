"""Kernel artifact format: deterministic content addresses, integrity and format checks, no pickle."""

from __future__ import annotations

import io
import json
import pickle
import struct
import sys

import pytest
import torch
from safetensors.torch import save as save_safetensors

from esper.blueprints import (
    build_kernel,
    create_artifact,
    decode_artifact,
    describe_artifact,
    encode_artifact,
    sha256_hex,
    verify_digest,
)
from esper.contracts import BlueprintSpec, KernelTarget, LayerKind
from esper.errors import ArtifactFormatError, ArtifactIntegrityError

SPEC = BlueprintSpec(family="lowrank_adapter", params={"rank": 3})
TARGET = KernelTarget(
    layer_kind=LayerKind.LINEAR, in_features=8, out_features=4, channel_dim=-1, spatial_dims=0
)


def _header_and_payload(data: bytes) -> tuple[dict[str, object], bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _with_header(header: dict[str, object], payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


def test_same_spec_target_and_seed_give_the_same_bytes_and_id() -> None:
    data_a, meta_a = create_artifact(SPEC, TARGET, init_seed=5)
    data_b, meta_b = create_artifact(SPEC, TARGET, init_seed=5)

    assert data_a == data_b
    assert meta_a.kernel_id == meta_b.kernel_id == sha256_hex(data_a)


def test_a_different_seed_spec_or_target_gives_a_different_id() -> None:
    def kernel_id(spec: BlueprintSpec, target: KernelTarget, init_seed: int) -> str:
        return create_artifact(spec, target, init_seed=init_seed)[1].kernel_id

    other_spec = BlueprintSpec(family="lowrank_adapter", params={"rank": 2})
    other_target = TARGET.model_copy(update={"in_features": 9})

    ids = {
        kernel_id(SPEC, TARGET, 5),
        kernel_id(SPEC, TARGET, 6),
        kernel_id(other_spec, TARGET, 5),
        kernel_id(SPEC, other_target, 5),
    }

    assert len(ids) == 4


def test_metadata_describes_the_artifact() -> None:
    data, meta = create_artifact(SPEC, TARGET, init_seed=5)
    _, payload = _header_and_payload(data)

    assert meta.blueprint == SPEC
    assert meta.target == TARGET
    assert meta.init_seed == 5
    assert meta.dtype == "float32"
    assert meta.parameter_count == 3 * 8 + 4 * 3
    assert meta.size_bytes == len(data)
    assert meta.checksum == sha256_hex(payload)
    assert describe_artifact(data) == meta


def test_decode_restores_the_exact_weights() -> None:
    module = build_kernel(SPEC, TARGET, init_seed=5)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))
    data = encode_artifact(module, SPEC, TARGET, init_seed=5)

    artifact = decode_artifact(data, sha256_hex(data))

    assert artifact.metadata.kernel_id == sha256_hex(data)
    loaded = artifact.module.state_dict()
    for name, tensor in module.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
    x = torch.randn(3, 8)
    assert torch.equal(artifact.module(x), module(x))


def test_a_flipped_byte_fails_the_integrity_check() -> None:
    data, meta = create_artifact(SPEC, TARGET, init_seed=5)
    corrupt = bytearray(data)
    corrupt[-3] ^= 0x01

    with pytest.raises(ArtifactIntegrityError, match=meta.kernel_id):
        decode_artifact(bytes(corrupt), meta.kernel_id)
    with pytest.raises(ArtifactIntegrityError):
        verify_digest(bytes(corrupt), meta.kernel_id)
    verify_digest(data, meta.kernel_id)


@pytest.mark.parametrize("keep", [0, 7, 8, 40, -4], ids=lambda k: f"keep_{k}")
def test_truncated_artifacts_are_format_errors(keep: int) -> None:
    data, _ = create_artifact(SPEC, TARGET, init_seed=5)

    with pytest.raises(ArtifactFormatError):
        decode_artifact(data[:keep])


def test_a_plain_safetensors_file_is_not_an_esper_artifact() -> None:
    data = save_safetensors({"weight": torch.zeros(2, 2)}, metadata={"format": "pt"})

    with pytest.raises(ArtifactFormatError, match="not an Esper kernel artifact"):
        decode_artifact(data)


def test_a_header_that_is_not_json_is_a_format_error() -> None:
    data = struct.pack("<Q", 12) + b"{not json!!}" + b"\x00" * 16

    with pytest.raises(ArtifactFormatError, match="not valid JSON"):
        decode_artifact(data)


def test_esper_metadata_that_is_not_json_is_a_format_error() -> None:
    data, _ = create_artifact(SPEC, TARGET, init_seed=5)
    header, payload = _header_and_payload(data)
    header["__metadata__"] = {"esper.kernel": "{broken"}

    with pytest.raises(ArtifactFormatError, match="malformed"):
        decode_artifact(_with_header(header, payload))


def test_an_unsupported_format_version_is_a_format_error() -> None:
    data, _ = create_artifact(SPEC, TARGET, init_seed=5)
    header, payload = _header_and_payload(data)
    esper_header = json.loads(header["__metadata__"]["esper.kernel"])  # type: ignore[index]
    esper_header["format_version"] = 99
    header["__metadata__"] = {"esper.kernel": json.dumps(esper_header)}

    with pytest.raises(ArtifactFormatError, match="version 99"):
        decode_artifact(_with_header(header, payload))


def test_an_unknown_family_in_the_header_is_a_format_error() -> None:
    data, _ = create_artifact(SPEC, TARGET, init_seed=5)
    header, payload = _header_and_payload(data)
    esper_header = json.loads(header["__metadata__"]["esper.kernel"])  # type: ignore[index]
    esper_header["blueprint"]["family"] = "no_such_family"
    header["__metadata__"] = {"esper.kernel": json.dumps(esper_header)}

    with pytest.raises(ArtifactFormatError, match="cannot be built"):
        decode_artifact(_with_header(header, payload))


def test_weights_that_do_not_match_the_blueprint_are_a_format_error() -> None:
    # A well-formed safetensors file with the Esper header of a rank-3 adapter but rank-2 weights.
    data, _ = create_artifact(SPEC, TARGET, init_seed=5)
    header, _ = _header_and_payload(data)
    wrong = save_safetensors(
        {"down.weight": torch.zeros(2, 8), "up.weight": torch.zeros(4, 2)},
        metadata=header["__metadata__"],  # type: ignore[arg-type]
    )

    with pytest.raises(ArtifactFormatError, match=r"'down.weight' is .* needs"):
        decode_artifact(wrong)


def test_missing_weights_are_a_format_error() -> None:
    data, _ = create_artifact(SPEC, TARGET, init_seed=5)
    header, _ = _header_and_payload(data)
    partial = save_safetensors(
        {"down.weight": torch.zeros(3, 8)},
        metadata=header["__metadata__"],  # type: ignore[arg-type]
    )

    with pytest.raises(ArtifactFormatError):
        decode_artifact(partial)


class _Payload:
    """Unpickling this object runs code: the artifact loader must never do it."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, ("import sys; sys.esper_test_unpickled = True",))


def test_a_pickle_payload_is_rejected_without_being_unpickled() -> None:
    data = pickle.dumps(_Payload())

    with pytest.raises(ArtifactFormatError):
        decode_artifact(data, sha256_hex(data))
    assert not hasattr(sys, "esper_test_unpickled")


def test_a_torch_save_file_is_rejected_without_being_unpickled() -> None:
    buffer = io.BytesIO()
    torch.save({"weights": torch.zeros(2), "payload": _Payload()}, buffer)
    data = buffer.getvalue()

    with pytest.raises(ArtifactFormatError):
        decode_artifact(data, sha256_hex(data))
    assert not hasattr(sys, "esper_test_unpickled")
