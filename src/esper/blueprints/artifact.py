"""The kernel artifact format: a safetensors file whose header carries the blueprint spec.

Layout: a standard safetensors file (``u64`` header length, JSON header, raw tensor bytes) whose
``__metadata__`` holds one entry, ``"esper.kernel"``: the canonical JSON of the blueprint spec,
target geometry, init seed and dtype. The artifact's id is the sha256 of its bytes, so the same
blueprint, target and seed always give the same id, and every load re-derives and checks it.

Loading interprets the spec with the builders that ship in :mod:`esper.blueprints` and reads the
weights with safetensors: nothing in an artifact is ever unpickled or executed.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

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
        init_seed = int(esper_header["init_seed"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, ValidationError) as exc:
        if isinstance(exc, ArtifactFormatError):
            raise
        raise ArtifactFormatError(f"kernel artifact header is malformed: {exc}") from None
    return spec, target, init_seed


def describe_artifact(data: bytes) -> KernelMetadata:
    """Metadata of artifact bytes (id, spec, target, sizes) without building the module."""
    header, payload = _split_header(data)
    spec, target, init_seed = _read_esper_header(header)
    parameter_count = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in info.get("shape", []):
            count *= int(dim)
        parameter_count += count
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
    metadata = describe_artifact(data)
    try:
        module = build_empty_kernel(metadata.blueprint, metadata.target)
    except BlueprintError as exc:
        raise ArtifactFormatError(f"kernel artifact's blueprint cannot be built: {exc}") from None
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
