"""Grafted kernel: a kernel module living in a seed, with the spec it was built from.

The spec (blueprint + target, as JSON) is kept as a ``uint8`` buffer so that a ``state_dict``
alone is enough to rebuild the seed's module structure when a checkpoint is loaded into a
freshly wrapped model. It is interpreted by the built-in blueprint builders: never executed.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from esper.contracts import BlueprintSpec, KernelTarget
from esper.errors import ArtifactFormatError

MAX_SPEC_BYTES = 64 * 1024
"""Bound on a seed spec's bytes: a real one is a few hundred; anything larger is refused unread."""


def encode_spec(spec: BlueprintSpec, target: KernelTarget) -> torch.Tensor:
    """The spec and target as canonical JSON bytes in a ``uint8`` tensor."""
    text = json.dumps(
        {"blueprint": spec.model_dump(mode="json"), "target": target.model_dump(mode="json")},
        sort_keys=True,
        separators=(",", ":"),
    )
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).clone()


def decode_spec(raw: object) -> tuple[BlueprintSpec, KernelTarget]:
    """Inverse of :func:`encode_spec`; :class:`ArtifactFormatError` if ``raw`` is not a spec (a
    1-D ``uint8`` tensor of at most :data:`MAX_SPEC_BYTES` bytes holding the JSON)."""
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8 or raw.dim() != 1:
        described = (
            f"a {raw.dtype} tensor of shape {tuple(raw.shape)}"
            if isinstance(raw, torch.Tensor)
            else type(raw).__name__
        )
        raise ArtifactFormatError(
            f"checkpoint holds a malformed seed spec: expected a 1-D uint8 tensor, got {described}"
        )
    if raw.numel() > MAX_SPEC_BYTES:
        raise ArtifactFormatError(
            f"checkpoint holds a malformed seed spec: {raw.numel()} bytes, more than the "
            f"{MAX_SPEC_BYTES} a spec may have"
        )
    try:
        payload = json.loads(bytes(raw.cpu().tolist()).decode())
        return (
            BlueprintSpec.model_validate(payload["blueprint"]),
            KernelTarget.model_validate(payload["target"]),
        )
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # JSON, pydantic, nesting
        raise ArtifactFormatError(f"checkpoint holds a malformed seed spec: {exc}") from None


class GraftedKernel(nn.Module):
    """A seed's kernel (``self.kernel``) and its spec bytes (buffer ``spec``)."""

    spec: torch.Tensor

    def __init__(self, kernel: nn.Module, spec: BlueprintSpec, target: KernelTarget) -> None:
        super().__init__()
        self.kernel = kernel
        self.register_buffer("spec", encode_spec(spec, target))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the kernel."""
        return self.kernel(x)

    def blueprint(self) -> tuple[BlueprintSpec, KernelTarget]:
        """The spec and target this kernel was built from."""
        return decode_spec(self.spec)
