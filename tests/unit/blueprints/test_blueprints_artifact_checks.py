"""An artifact's tensor table must be exactly its blueprint's (issue 9, item 5): names, dtypes,
shapes and byte ranges are checked against the blueprint built on the meta device before any
weight is read, so a file mixing dtypes or a spec that does not describe its bytes is refused
at load with a clear error."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save as save_safetensors

from esper.blueprints import create_artifact, decode_artifact, describe_artifact, sha256_hex
from esper.contracts import BlueprintSpec, KernelTarget, LayerKind
from esper.errors import ArtifactFormatError

SPEC = BlueprintSpec(family="residual_mlp", params={"hidden": 4})
TARGET = KernelTarget(
    layer_kind=LayerKind.LINEAR, in_features=6, out_features=5, channel_dim=-1, spatial_dims=0
)


def _split(data: bytes) -> tuple[dict[str, object], bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _join(header: dict[str, object], payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


def _tensors() -> dict[str, torch.Tensor]:
    data, _ = create_artifact(SPEC, TARGET)
    return dict(decode_artifact(data).module.state_dict())


def _metadata() -> dict[str, str]:
    header, _ = _split(create_artifact(SPEC, TARGET)[0])
    return header["__metadata__"]  # type: ignore[return-value]


def _refused(data: bytes, match: str) -> None:
    with pytest.raises(ArtifactFormatError, match=match):
        describe_artifact(data)
    with pytest.raises(ArtifactFormatError, match=match):
        decode_artifact(data, sha256_hex(data))


def test_a_file_mixing_dtypes_is_refused_at_load() -> None:
    tensors = _tensors()
    tensors["up.weight"] = tensors["up.weight"].double()  # one float64 tensor in a float32 kernel

    _refused(save_safetensors(tensors, metadata=_metadata()), r"'up.weight' is \('F64'")


def test_a_spec_edited_to_a_wider_kernel_is_refused_before_reading_weights() -> None:
    data, _ = create_artifact(SPEC, TARGET)
    header, payload = _split(data)
    esper_header = json.loads(header["__metadata__"]["esper.kernel"])  # type: ignore[index]
    esper_header["blueprint"]["params"]["hidden"] = 65536
    header["__metadata__"] = {"esper.kernel": json.dumps(esper_header)}

    _refused(_join(header, payload), r"needs \('F32', \[65536, 6\]\)")


def test_a_tensor_table_that_lies_about_shapes_is_refused_by_describe() -> None:
    data, _ = create_artifact(SPEC, TARGET)
    header, payload = _split(data)
    header["down.bias"]["shape"] = [10**9]  # type: ignore[index]

    _refused(_join(header, payload), "'down.bias'")


@pytest.mark.parametrize("offsets", [[0, 10**9], [-4, 12], [8, 4], "0-16", [0.0, 16.0], [True, 17]])
def test_byte_ranges_outside_the_payload_are_refused(offsets: object) -> None:
    data, _ = create_artifact(SPEC, TARGET)
    header, payload = _split(data)
    header["down.bias"]["data_offsets"] = offsets  # type: ignore[index]

    _refused(_join(header, payload), "data offsets")


def test_missing_and_extra_tensors_are_refused() -> None:
    tensors = _tensors()
    tensors["extra"] = torch.zeros(2)
    _refused(save_safetensors(tensors, metadata=_metadata()), "extra")
    del tensors["extra"], tensors["up.bias"]
    _refused(save_safetensors(tensors, metadata=_metadata()), "up.bias")


@pytest.mark.parametrize("init_seed", ["5", 1.5, True, None, [5]])
def test_an_init_seed_that_is_not_an_integer_is_refused(init_seed: object) -> None:
    data, _ = create_artifact(SPEC, TARGET)
    header, payload = _split(data)
    esper_header = json.loads(header["__metadata__"]["esper.kernel"])  # type: ignore[index]
    esper_header["init_seed"] = init_seed
    header["__metadata__"] = {"esper.kernel": json.dumps(esper_header)}

    _refused(_join(header, payload), "init_seed|malformed")


def test_a_deeply_nested_header_is_a_format_error() -> None:
    data, _ = create_artifact(SPEC, TARGET)
    header, payload = _split(data)
    header["__metadata__"] = {"esper.kernel": "[" * 100_000 + "]" * 100_000}

    _refused(_join(header, payload), "malformed")


def test_a_well_formed_artifact_still_loads_with_its_parameter_count() -> None:
    data, meta = create_artifact(SPEC, TARGET)

    assert meta.parameter_count == 6 * 4 + 4 + 5 * 4 + 5
    assert decode_artifact(data, meta.kernel_id).metadata == meta
