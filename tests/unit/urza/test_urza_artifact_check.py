"""Issue 9 item 7: the library stores no metadata that does not describe the artifact's bytes.

``put_kernel`` used to check only size and sha256, so junk bytes under valid metadata were stored
(and handed out by ``find_or_enqueue`` forever), and a large ``residual_mlp`` artifact labelled
``lowrank_adapter rank 4`` with ``parameter_count=1`` was served, bypassing parameter budgets.
Now the artifact's header is read and every field the bytes determine is compared.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from collections.abc import Callable
from typing import Any

import pytest

from esper.blueprints import create_artifact, describe_artifact
from esper.blueprints.registry import DTYPES
from esper.contracts import BlueprintSpec, KernelMetadata, KernelTarget, LayerKind
from esper.errors import ArtifactFormatError
from esper.tezzeret import find_or_enqueue
from esper.urza.artifact_check import SAFETENSORS_DTYPE_OF, scan_artifact
from esper.urza.errors import ARTIFACT_REFUSALS, KernelMetadataMismatchError
from esper.urza.storage_library import StorageLibrary
from factories import conv2d_target, linear_target

LINEAR = linear_target(16, 8)
CONV = conv2d_target(8, 8)
RESIDUAL = BlueprintSpec(family="residual_mlp", params={"hidden": 64})
LOWRANK4 = BlueprintSpec(family="lowrank_adapter", params={"rank": 4})


def _assert_nothing_stored(library: StorageLibrary, kernel_id: str) -> None:
    assert library.stats().kernels == 0
    assert library.find_kernels() == []
    assert not library.blobs.exists(kernel_id)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize(
    ("spec", "target"),
    [
        (RESIDUAL, LINEAR),
        (BlueprintSpec(family="residual_mlp", params={"hidden": 8, "norm": True}), LINEAR),
        (LOWRANK4, LINEAR),
        (BlueprintSpec(family="conv_adapter", params={"mode": "depthwise"}), CONV),
        (BlueprintSpec(family="conv_adapter"), CONV),
    ],
    ids=["residual", "residual_norm", "lowrank", "conv_depthwise", "conv_pointwise"],
)
def test_urza_reads_the_same_facts_as_the_artifact_format(
    spec: BlueprintSpec, target: KernelTarget, dtype: str
) -> None:
    data, _ = create_artifact(spec, target.model_copy(update={"dtype": dtype}), init_seed=7)
    expected = describe_artifact(data)

    facts = scan_artifact(io.BytesIO(data)).facts()

    assert {name: getattr(facts, name) for name in _DETERMINED} == {
        name: getattr(expected, name) for name in _DETERMINED
    }
    assert SAFETENSORS_DTYPE_OF.keys() == DTYPES.keys()


_DETERMINED = (
    "kernel_id",
    "size_bytes",
    "checksum",
    "blueprint",
    "target",
    "init_seed",
    "parameter_count",
    "dtype",
)


def test_a_real_artifact_with_its_own_metadata_is_stored(library: StorageLibrary) -> None:
    data, metadata = create_artifact(RESIDUAL, LINEAR, init_seed=3)
    assert library.put_kernel(data, metadata) == metadata
    assert library.get_kernel_bytes(metadata.kernel_id) == data


@pytest.mark.parametrize("size", [8, 64, 4096])
def test_junk_bytes_under_valid_metadata_are_refused(library: StorageLibrary, size: int) -> None:
    _, real = create_artifact(RESIDUAL, LINEAR)
    junk = os.urandom(size)
    metadata = real.model_copy(
        update={"kernel_id": hashlib.sha256(junk).hexdigest(), "size_bytes": size}
    )

    with pytest.raises(ArtifactFormatError, match="not an Esper kernel artifact"):
        library.put_kernel(junk, metadata)
    _assert_nothing_stored(library, metadata.kernel_id)


def test_a_mislabelled_artifact_is_not_served_by_find_or_enqueue(
    library: StorageLibrary,
) -> None:
    """The issue's example: a residual_mlp artifact labelled lowrank rank 4, 1 parameter."""
    data, real = create_artifact(
        BlueprintSpec(family="residual_mlp", params={"hidden": 512}), LINEAR
    )
    forged = real.model_copy(update={"blueprint": LOWRANK4, "parameter_count": 1})

    with pytest.raises(KernelMetadataMismatchError) as caught:
        library.put_kernel(data, forged)
    message = str(caught.value)
    assert "blueprint" in message and "parameter_count" in message and "1" in message
    assert f"the artifact {real.parameter_count}" in message
    _assert_nothing_stored(library, real.kernel_id)
    request = find_or_enqueue(library, LOWRANK4, LINEAR)
    assert request.kernel is None and request.job is not None  # compiled for real instead


@pytest.mark.parametrize(
    ("field", "claimed"),
    [
        ("blueprint", LOWRANK4),
        ("target", LINEAR.model_copy(update={"in_features": 32})),
        ("target", LINEAR.model_copy(update={"out_features": 4})),
        ("target", LINEAR.model_copy(update={"layer_kind": LayerKind.LAYER_NORM})),
        ("target", LINEAR.model_copy(update={"device": "cuda"})),
        ("init_seed", 1),
        ("parameter_count", 10),
        ("dtype", "float64"),
        ("checksum", "0" * 64),
    ],
    ids=[
        "blueprint",
        "in_features",
        "out_features",
        "layer_kind",
        "device",
        "init_seed",
        "parameter_count",
        "dtype",
        "checksum",
    ],
)
def test_each_claim_the_bytes_contradict_is_refused(
    library: StorageLibrary, field: str, claimed: Any
) -> None:
    data, real = create_artifact(RESIDUAL, LINEAR)
    wrong = real.model_copy(update={field: claimed})

    with pytest.raises(KernelMetadataMismatchError, match=f"{field}: the metadata says"):
        library.put_kernel(data, wrong)
    _assert_nothing_stored(library, real.kernel_id)
    assert issubclass(KernelMetadataMismatchError, ARTIFACT_REFUSALS)


def _artifact(header: dict[str, Any], payload: bytes, *, raw_header: bytes | None = None) -> bytes:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + payload


def _entry(**overrides: Any) -> dict[str, str]:
    entry = {
        "format": "esper.kernel",
        "format_version": 1,
        "blueprint": RESIDUAL.model_dump(mode="json"),
        "target": LINEAR.model_dump(mode="json"),
        "init_seed": 0,
        **overrides,
    }
    return {"esper.kernel": json.dumps(entry)}


def _tensor(dtype: str, shape: list[int], start: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


MALFORMED: dict[str, Callable[[], bytes]] = {
    "truncated_header": lambda: struct.pack("<Q", 1000) + b"{}",
    "huge_header_length": lambda: struct.pack("<Q", 2**63) + b"{}",
    "header_not_json": lambda: _artifact({}, b"", raw_header=b"{not json"),
    "header_not_object": lambda: _artifact({}, b"", raw_header=b"[1, 2]"),
    "no_esper_entry": lambda: _artifact({"w": _tensor("F32", [2], 0, 8)}, bytes(8)),
    "esper_entry_not_json": lambda: _artifact(
        {"__metadata__": {"esper.kernel": "{"}, "w": _tensor("F32", [2], 0, 8)}, bytes(8)
    ),
    "other_format": lambda: _artifact(
        {"__metadata__": _entry(format="other"), "w": _tensor("F32", [2], 0, 8)}, bytes(8)
    ),
    "future_version": lambda: _artifact(
        {"__metadata__": _entry(format_version=2), "w": _tensor("F32", [2], 0, 8)}, bytes(8)
    ),
    "bad_target": lambda: _artifact(
        {"__metadata__": _entry(target={**LINEAR.model_dump(), "in_features": 10**12})},
        b"",
    ),
    "huge_init_seed": lambda: _artifact({"__metadata__": _entry(init_seed=2**70)}, b""),
    "float_init_seed": lambda: _artifact({"__metadata__": _entry(init_seed=1.5)}, b""),
    "unknown_tensor_dtype": lambda: _artifact(
        {"__metadata__": _entry(), "w": _tensor("F128", [2], 0, 32)}, bytes(32)
    ),
    "mixed_float_dtypes": lambda: _artifact(
        {
            "__metadata__": _entry(),
            "w": _tensor("F32", [2], 0, 8),
            "v": _tensor("F64", [2], 8, 24),
        },
        bytes(24),
    ),
    "shape_and_bytes_disagree": lambda: _artifact(
        {"__metadata__": _entry(), "w": _tensor("F32", [3], 0, 8)}, bytes(8)
    ),
    "gap_between_tensors": lambda: _artifact(
        {"__metadata__": _entry(), "w": _tensor("F32", [1], 0, 4), "v": _tensor("F32", [1], 8, 12)},
        bytes(12),
    ),
    "overlapping_tensors": lambda: _artifact(
        {"__metadata__": _entry(), "w": _tensor("F32", [2], 0, 8), "v": _tensor("F32", [1], 4, 8)},
        bytes(8),
    ),
    "trailing_bytes": lambda: _artifact(
        {"__metadata__": _entry(), "w": _tensor("F32", [2], 0, 8)}, bytes(12)
    ),
    "range_past_the_end": lambda: _artifact(
        {"__metadata__": _entry(), "w": _tensor("F32", [4], 0, 16)}, bytes(8)
    ),
    "negative_dimension": lambda: _artifact(
        {"__metadata__": _entry(), "w": _tensor("F32", [-2], 0, 0)}, b""
    ),
    "extra_tensor_keys": lambda: _artifact(
        {"__metadata__": _entry(), "w": {**_tensor("F32", [2], 0, 8), "x": 1}}, bytes(8)
    ),
    "deeply_nested_header": lambda: _artifact({}, b"", raw_header=b"[" * 100_000 + b"]" * 100_000),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_artifacts_are_refused_with_the_reason(
    library: StorageLibrary, name: str
) -> None:
    data = MALFORMED[name]()
    metadata = KernelMetadata(
        kernel_id=hashlib.sha256(data).hexdigest(),
        blueprint=RESIDUAL,
        target=LINEAR,
        dtype="float32",
        parameter_count=2,
        size_bytes=len(data),
        checksum="0" * 64,
        init_seed=0,
    )
    with pytest.raises(ArtifactFormatError, match="not an Esper kernel artifact"):
        library.put_kernel(data, metadata)
    _assert_nothing_stored(library, metadata.kernel_id)


def test_integer_tensors_are_not_held_to_the_kernel_dtype(library: StorageLibrary) -> None:
    """A kernel may carry integer buffers (BatchNorm's ``num_batches_tracked`` is int64)."""
    payload = os.urandom(8) + bytes(8)
    data = _artifact(
        {"__metadata__": _entry(), "w": _tensor("F32", [2], 0, 8), "n": _tensor("I64", [], 8, 16)},
        payload,
    )
    metadata = KernelMetadata(
        kernel_id=hashlib.sha256(data).hexdigest(),
        blueprint=RESIDUAL,
        target=LINEAR,
        dtype="float32",
        parameter_count=3,
        size_bytes=len(data),
        checksum=hashlib.sha256(payload).hexdigest(),
        init_seed=0,
    )
    assert library.put_kernel(data, metadata) == metadata
