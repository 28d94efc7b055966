"""The kernel artifact format: a safetensors file whose header carries the blueprint spec.

Layout: a standard safetensors file (``u64`` header length, JSON header, raw tensor bytes) whose
``__metadata__`` holds one entry, ``"esper.kernel"``: the canonical JSON of the blueprint spec,
target geometry, init seed and dtype. The artifact's id is the sha256 of its bytes, so the same
blueprint, target and seed always give the same id, and every load re-derives and checks it.

Loading interprets the spec with the builders that ship in :mod:`esper.blueprints` and reads the
weights with safetensors: nothing in an artifact is ever unpickled or executed. Before any weight
is read, the header's tensor table is checked against the blueprint built on the meta device:
the same tensor names, each with the blueprint's dtype and shape and a byte range of exactly that
size inside the payload. An artifact whose spec does not describe its bytes (a mixed dtype, an
edited ``hidden`` width) is refused without allocating anything.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from esper.blueprints.registry import build_empty_kernel, build_kernel
from esper.contracts import BlueprintSpec, KernelMetadata, KernelTarget
from esper.errors import ArtifactFormatError, ArtifactIntegrityError, BlueprintError

FORMAT_NAME = "esper.kernel"
FORMAT_VERSION = 1
_METADATA_KEY = "esper.kernel"
_MAX_HEADER_BYTES = 16 * 1024 * 1024
_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
"""The safetensors header's name for each dtype a kernel tensor may have."""


@dataclass(frozen=True)
class KernelArtifact:
    """A decoded, verified artifact: its metadata and a module holding its weights (on CPU)."""

    metadata: KernelMetadata
    module: nn.Module


def sha256_hex(data: bytes) -> str:
    """Lowercase hex sha256 of ``data``: the content address used throughout Esper."""
    return hashlib.sha256(data).hexdigest()


def encode_artifact(
    module: nn.Module, spec: BlueprintSpec, target: KernelTarget, *, init_seed: int
) -> bytes:
    """Serialize a kernel module built from ``spec`` for ``target`` into artifact bytes."""
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "blueprint": spec.model_dump(mode="json"),
        "target": target.model_dump(mode="json"),
        "init_seed": init_seed,
    }
    tensors = {name: t.detach().cpu().contiguous() for name, t in module.state_dict().items()}
    metadata = {_METADATA_KEY: json.dumps(header, sort_keys=True, separators=(",", ":"))}
    return save_safetensors(tensors, metadata=metadata)


def create_artifact(
    spec: BlueprintSpec, target: KernelTarget, *, init_seed: int = 0
) -> tuple[bytes, KernelMetadata]:
    """Build a fresh, function-preserving kernel for ``target`` and serialize it.

    Deterministic: the same arguments always return the same bytes (and so the same id).
    """
    module = build_kernel(spec, target.model_copy(update={"device": "cpu"}), init_seed=init_seed)
    data = encode_artifact(module, spec, target, init_seed=init_seed)
    return data, describe_artifact(data)


def _split_header(data: bytes) -> tuple[dict[str, Any], bytes]:
    """The safetensors JSON header and the raw tensor payload of ``data``, bounds-checked."""
    if len(data) < 8:
        raise ArtifactFormatError(
            f"kernel artifact is {len(data)} bytes, too short to be a safetensors file; "
            "the artifact is truncated or not an Esper kernel"
        )
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(len(data) - 8, _MAX_HEADER_BYTES):
        raise ArtifactFormatError(
            f"kernel artifact declares a {header_len}-byte header but holds {len(data) - 8} bytes "
            "after the length field; the artifact is truncated or corrupt"
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactFormatError(f"kernel artifact header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ArtifactFormatError("kernel artifact header is not a JSON object")
    return header, data[8 + header_len :]


def _read_esper_header(header: dict[str, Any]) -> tuple[BlueprintSpec, KernelTarget, int]:
    raw = (header.get("__metadata__") or {}).get(_METADATA_KEY)
    if raw is None:
        raise ArtifactFormatError(
            f"safetensors file has no {_METADATA_KEY!r} metadata: it is not an Esper kernel "
            "artifact (create one with esper.blueprints.create_artifact or Tezzeret)"
        )
    try:
        esper_header = json.loads(raw)
        if esper_header.get("format") != FORMAT_NAME:
            raise ArtifactFormatError(f"artifact format is {esper_header.get('format')!r}")
        version = esper_header.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactFormatError(
                f"artifact format version {version!r} is not supported (this Esper reads "
                f"version {FORMAT_VERSION}); upgrade Esper or recompile the blueprint"
            )
        spec = BlueprintSpec.model_validate(esper_header["blueprint"])
        target = KernelTarget.model_validate(esper_header["target"])
        init_seed = esper_header["init_seed"]
        if not isinstance(init_seed, int) or isinstance(init_seed, bool):
            raise ArtifactFormatError(f"artifact init_seed {init_seed!r} is not an integer")
    except (KeyError, TypeError, ValueError, RecursionError, ValidationError) as exc:
        if isinstance(exc, ArtifactFormatError):
            raise
        raise ArtifactFormatError(f"kernel artifact header is malformed: {exc}") from None
    return spec, target, init_seed


def _check_tensor_table(
    header: dict[str, Any], payload_bytes: int, spec: BlueprintSpec, target: KernelTarget
) -> int:
    """Check the header's tensors against the blueprint (built on the meta device: no memory);
    returns their element count.

    Raises:
        ArtifactFormatError: a tensor is missing, extra, of another dtype or shape than the
            blueprint's, or its byte range does not fit the payload.
    """
    try:
        expected = build_empty_kernel(spec, target).state_dict()
    except BlueprintError as exc:
        raise ArtifactFormatError(f"kernel artifact's blueprint cannot be built: {exc}") from None
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    if set(tensors) != set(expected):
        raise ArtifactFormatError(
            f"kernel artifact holds tensors {sorted(tensors)} but blueprint {spec.family!r} for "
            f"{target.describe()} has {sorted(expected)}"
        )
    count = 0
    for name, reference in expected.items():
        info = tensors[name]
        dtype = _SAFETENSORS_DTYPES.get(reference.dtype, "?")
        shape = list(reference.shape)
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not isinstance(info, dict) or info.get("dtype") != dtype or info.get("shape") != shape:
            found = (info.get("dtype"), info.get("shape")) if isinstance(info, dict) else info
            raise ArtifactFormatError(
                f"kernel artifact tensor {name!r} is {found!r} but blueprint {spec.family!r} for "
                f"{target.describe()} needs ({dtype!r}, {shape}); the artifact is corrupt or its "
                "spec was edited"
            )
        nbytes = reference.numel() * reference.element_size()
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= payload_bytes
            and offsets[1] - offsets[0] == nbytes
        ):
            raise ArtifactFormatError(
                f"kernel artifact tensor {name!r} has data offsets {offsets!r}, not a range of "
                f"{nbytes} bytes inside its {payload_bytes}-byte payload"
            )
        count += reference.numel()
    return count


def describe_artifact(data: bytes) -> KernelMetadata:
    """Metadata of artifact bytes (id, spec, target, sizes) without reading the weights.

    Raises:
        ArtifactFormatError: the bytes are not a well-formed artifact, or their tensors are not
            exactly those of the blueprint their header names (names, dtypes, shapes, sizes).
    """
    header, payload = _split_header(data)
    spec, target, init_seed = _read_esper_header(header)
    parameter_count = _check_tensor_table(header, len(payload), spec, target)
    return KernelMetadata(
        kernel_id=sha256_hex(data),
        blueprint=spec,
        target=target,
        dtype=target.dtype,
        parameter_count=parameter_count,
        size_bytes=len(data),
        checksum=sha256_hex(payload),
        init_seed=init_seed,
    )


def verify_digest(data: bytes, expected_id: str) -> None:
    """Raise :class:`ArtifactIntegrityError` unless ``sha256(data) == expected_id``."""
    actual = sha256_hex(data)
    if actual != expected_id:
        raise ArtifactIntegrityError(
            f"kernel artifact {expected_id} failed its integrity check: the bytes hash to {actual}. "
            "The stored copy is corrupt or was tampered with; delete it and recompile the blueprint."
        )


def decode_artifact(data: bytes, expected_id: str | None = None) -> KernelArtifact:
    """Verify and decode artifact bytes into metadata plus a CPU module holding the weights.

    Args:
        data: the artifact's bytes.
        expected_id: the kernel id the bytes were requested under; checked against their sha256.

    Raises:
        ArtifactIntegrityError: the bytes do not hash to ``expected_id``.
        ArtifactFormatError: the bytes are not a well-formed kernel artifact.
    """
    if expected_id is not None:
        verify_digest(data, expected_id)
    metadata = describe_artifact(data)  # the tensor table already matches the blueprint
    module = build_empty_kernel(metadata.blueprint, metadata.target)
    try:
        tensors = load_safetensors(data)
        module.load_state_dict(tensors, strict=True, assign=True)
    except Exception as exc:  # safetensors raises its own error types for malformed payloads
        raise ArtifactFormatError(
            f"kernel artifact {metadata.kernel_id}: weights do not match blueprint "
            f"{metadata.blueprint.family!r} for {metadata.target.describe()} ({exc})"
        ) from None
    if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        raise ArtifactFormatError(
            f"kernel artifact {metadata.kernel_id} lacks some of the blueprint's tensors"
        )
    return KernelArtifact(metadata=metadata, module=module)
