"""Grafted kernel: a kernel module living in a seed, with the spec it was built from.

The spec (blueprint + target, as JSON) is kept as a ``uint8`` buffer so that a ``state_dict``
alone is enough to rebuild the seed's module structure when a checkpoint is loaded into a
freshly wrapped model. It is interpreted by the built-in blueprint builders: never executed.
"""

from __future__ import annotations

import json

import torch
from pydantic import ValidationError
from torch import nn

from esper.contracts import BlueprintSpec, KernelTarget
from esper.errors import ArtifactFormatError


def encode_spec(spec: BlueprintSpec, target: KernelTarget) -> torch.Tensor:
    """The spec and target as canonical JSON bytes in a ``uint8`` tensor."""
    text = json.dumps(
        {"blueprint": spec.model_dump(mode="json"), "target": target.model_dump(mode="json")},
        sort_keys=True,
        separators=(",", ":"),
    )
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).clone()


def decode_spec(raw: torch.Tensor) -> tuple[BlueprintSpec, KernelTarget]:
    """Inverse of :func:`encode_spec`; :class:`ArtifactFormatError` if the bytes are not a spec."""
    try:
        payload = json.loads(bytes(raw.cpu().tolist()).decode())
        return (
            BlueprintSpec.model_validate(payload["blueprint"]),
            KernelTarget.model_validate(payload["target"]),
        )
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValidationError) as exc:
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
