"""Artifact check: what a kernel artifact's bytes say about themselves, against its claimed metadata.

The library stores metadata next to every artifact and answers queries from it (find a kernel for
this blueprint and layer, how many parameters it adds), so metadata that does not describe the
bytes would be served as truth forever. Before a put is accepted, the artifact is read here, in
one streaming pass and without torch:

1. :func:`scan_artifact`: its sha256 (the kernel id) and size, the sha256 of the tensor payload
   (the ``checksum``), its raw header;
2. :meth:`ArtifactScan.facts`: the safetensors header, every tensor's dtype, shape and byte
   range, which must tile the payload exactly (no gaps, no overlaps, no bytes left over), and
   Esper's ``esper.kernel`` entry in the header: blueprint spec, target, init seed.

:func:`check_metadata` then compares every field of :class:`~esper.contracts.KernelMetadata`
that the bytes determine (all but ``characterization``) with what was claimed, and refuses the
put naming each difference. Bytes that are no kernel artifact raise
:class:`~esper.errors.ArtifactFormatError`.

This module mirrors the reader of :mod:`esper.blueprints.artifact` (the writer of the format),
which Urza may not import; a test checks that both read the same facts from every built-in
family's artifacts.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

from pydantic import ValidationError

from esper.contracts import BlueprintSpec, KernelMetadata, KernelTarget
from esper.contracts.bounds import MAX_INT64
from esper.errors import ArtifactFormatError
from esper.urza.errors import KernelMetadataMismatchError

FORMAT_NAME = "esper.kernel"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 16 * 1024 * 1024
"""Largest safetensors header accepted (the same bound as the artifact reader's)."""

_READ_BYTES = 1024 * 1024

SAFETENSORS_DTYPE_OF = {"float32": "F32", "float64": "F64", "float16": "F16", "bfloat16": "BF16"}
"""Safetensors dtype code of each kernel dtype name (the names of ``esper.blueprints``)."""

_ELEMENT_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_FLOAT_CODES = frozenset({"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"})


@dataclass(frozen=True)
class ArtifactFacts:
    """What an artifact's bytes determine about it.

    Attributes:
        kernel_id: sha256 of all the bytes.
        size_bytes: how many bytes.
        checksum: sha256 of the tensor payload (the bytes after the header).
        blueprint: the spec in the ``esper.kernel`` header entry.
        target: the target in that entry (geometry, layer kind, dtype, device).
        init_seed: the init seed in that entry.
        parameter_count: elements of all tensors.
        dtype: the kernel's dtype (the target's; every floating-point tensor has it).
    """

    kernel_id: str
    size_bytes: int
    checksum: str
    blueprint: BlueprintSpec
    target: KernelTarget
    init_seed: int
    parameter_count: int
    dtype: str


@dataclass(frozen=True)
class ArtifactScan:
    """One pass over an artifact's bytes: their digests and size, and the raw header.

    Attributes:
        kernel_id: sha256 of all the bytes.
        size_bytes: how many bytes.
        checksum: sha256 of the bytes after the header.
        header: the header's JSON bytes (``None`` when the bytes hold no complete header).
        problem: why there is no header, if there is none.
    """

    kernel_id: str
    size_bytes: int
    checksum: str
    header: bytes | None
    problem: str | None

    def facts(self) -> ArtifactFacts:
        """What the header says, checked for consistency with the payload.

        Raises:
            ArtifactFormatError: the bytes are not a well-formed Esper kernel artifact.
        """
        try:
            return _facts(self)
        except (ValueError, RecursionError) as error:
            raise _format_error(self.kernel_id, str(error)) from None


def _read(file: BinaryIO, size: int, digests: tuple[Any, ...]) -> bytes:
    data = file.read(size)
    for digest in digests:
        digest.update(data)
    return data


def scan_artifact(file: BinaryIO) -> ArtifactScan:
    """Read ``file`` from its current position to its end, once (in 1 MiB reads)."""
    whole, payload = hashlib.sha256(), hashlib.sha256()
    prefix = _read(file, 8, (whole,))
    size = len(prefix)
    header: bytes | None = None
    problem: str | None = None
    if len(prefix) < 8:
        problem = f"{len(prefix)} bytes is too short to be a safetensors file"
    else:
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            problem = f"it declares a {header_len}-byte header (at most {MAX_HEADER_BYTES})"
        else:
            header = _read(file, header_len, (whole,))
            size += len(header)
            if len(header) < header_len:
                problem = f"it declares a {header_len}-byte header but ends after {len(header)}"
                header = None
    rest = (whole,) if header is None else (whole, payload)
    while chunk := _read(file, _READ_BYTES, rest):
        size += len(chunk)
    return ArtifactScan(whole.hexdigest(), size, payload.hexdigest(), header, problem)


def _format_error(kernel_id: str, problem: str) -> ArtifactFormatError:
    return ArtifactFormatError(
        f"kernel {kernel_id}: the bytes are not an Esper kernel artifact ({problem}); nothing "
        "was stored. Put the bytes that esper.blueprints.create_artifact or a Tezzeret compile "
        "produced."
    )


def _tensor_elements(name: str, info: Any, payload_bytes: int) -> tuple[int, str, int, int]:
    """(elements, dtype code, start, end) of one tensor entry, or ValueError saying why not."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"tensor {name!r} is not a {{dtype, shape, data_offsets}} entry")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if code not in _ELEMENT_BYTES:
        raise ValueError(f"tensor {name!r} has unknown dtype {code!r}")
    if not isinstance(shape, list) or not all(
        type(d) is int and 0 <= d <= MAX_INT64 for d in shape
    ):
        raise ValueError(f"tensor {name!r} has a malformed shape {shape!r:.80}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1] <= payload_bytes
    ):
        raise ValueError(f"tensor {name!r} has byte range {offsets!r:.80} outside the payload")
    elements = math.prod(shape)
    if elements * _ELEMENT_BYTES[code] != offsets[1] - offsets[0]:
        raise ValueError(
            f"tensor {name!r} of shape {shape} ({code}) needs {elements * _ELEMENT_BYTES[code]} "
            f"bytes but its byte range holds {offsets[1] - offsets[0]}"
        )
    return elements, code, offsets[0], offsets[1]


def _esper_entry(header: dict[str, Any]) -> tuple[BlueprintSpec, KernelTarget, int]:
    metadata = header.get("__metadata__")
    raw = metadata.get(FORMAT_NAME) if isinstance(metadata, dict) else None
    if not isinstance(raw, str):
        raise ValueError(f"the safetensors header has no {FORMAT_NAME!r} metadata entry")
    try:
        entry = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"its {FORMAT_NAME!r} entry is not JSON ({error})") from None
    if not isinstance(entry, dict) or entry.get("format") != FORMAT_NAME:
        raise ValueError(f"its {FORMAT_NAME!r} entry does not name the format")
    if entry.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"format version {entry.get('format_version')!r:.20} (this library reads "
            f"{FORMAT_VERSION})"
        )
    try:
        spec = BlueprintSpec.model_validate(entry.get("blueprint"))
        target = KernelTarget.model_validate(entry.get("target"))
    except ValidationError as error:
        raise ValueError(f"its {FORMAT_NAME!r} entry is malformed: {error}") from None
    init_seed = entry.get("init_seed")
    if type(init_seed) is not int or not 0 <= init_seed <= MAX_INT64:
        raise ValueError(f"its init seed {init_seed!r:.40} is not a non-negative 64-bit integer")
    return spec, target, init_seed


def _facts(scan: ArtifactScan) -> ArtifactFacts:
    if scan.header is None:
        raise ValueError(scan.problem or "it has no header")
    try:
        header = json.loads(scan.header)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"its header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    spec, target, init_seed = _esper_entry(header)
    payload_bytes = scan.size_bytes - 8 - len(scan.header)
    tensors = [
        _tensor_elements(name, info, payload_bytes)
        for name, info in header.items()
        if name != "__metadata__"
    ]
    covered = 0
    for _, _, start, end in sorted(tensors, key=lambda t: (t[2], t[3])):
        if start != covered:
            raise ValueError(f"its tensors leave a gap or overlap at payload byte {covered}")
        covered = end
    if covered != payload_bytes:
        raise ValueError(f"{payload_bytes - covered} payload bytes belong to no tensor")
    expected_code = SAFETENSORS_DTYPE_OF.get(target.dtype)
    if expected_code is None:
        raise ValueError(
            f"its dtype {target.dtype!r} is not a kernel dtype ({', '.join(SAFETENSORS_DTYPE_OF)})"
        )
    stray = sorted({code for _, code, _, _ in tensors if code in _FLOAT_CODES} - {expected_code})
    if stray:
        raise ValueError(
            f"it declares dtype {target.dtype} but holds {', '.join(stray)} tensors "
            f"(expected {expected_code} only)"
        )
    return ArtifactFacts(
        kernel_id=scan.kernel_id,
        size_bytes=scan.size_bytes,
        checksum=scan.checksum,
        blueprint=spec,
        target=target,
        init_seed=init_seed,
        parameter_count=sum(elements for elements, _, _, _ in tensors),
        dtype=target.dtype,
    )


def check_metadata(facts: ArtifactFacts, metadata: KernelMetadata) -> None:
    """Refuse ``metadata`` unless it says what the artifact's bytes say, field by field.

    Raises:
        KernelMetadataMismatchError: naming every field whose claim the bytes contradict.
    """
    claims: dict[str, tuple[object, object]] = {
        "kernel_id": (metadata.kernel_id, facts.kernel_id),
        "size_bytes": (metadata.size_bytes, facts.size_bytes),
        "checksum": (metadata.checksum, facts.checksum),
        "blueprint": (metadata.blueprint.canonical_json(), facts.blueprint.canonical_json()),
        "target": (metadata.target.model_dump_json(), facts.target.model_dump_json()),
        "init_seed": (metadata.init_seed, facts.init_seed),
        "parameter_count": (metadata.parameter_count, facts.parameter_count),
        "dtype": (metadata.dtype, facts.dtype),
    }
    wrong = [
        f"{field}: the metadata says {claimed}, the artifact {actual}"
        for field, (claimed, actual) in claims.items()
        if claimed != actual
    ]
    if wrong:
        raise KernelMetadataMismatchError(
            f"kernel {facts.kernel_id}: the metadata does not describe the artifact's bytes, so "
            f"nothing was stored ({'; '.join(wrong)}). Put the metadata of the artifact itself "
            "(esper.blueprints.describe_artifact(artifact), or a Tezzeret compile's)."
        )
