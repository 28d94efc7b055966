"""Kernel requests: reuse a compiled kernel from Urza, or queue a compile for Tezzeret."""

from __future__ import annotations

from dataclasses import dataclass

from esper.contracts import (
    BlueprintSpec,
    BlueprintStatus,
    CompileJob,
    KernelMetadata,
    KernelTarget,
)
from esper.tezzeret.compiler import BlueprintValidationError
from esper.urza import ArtifactLibrary


@dataclass(frozen=True)
class KernelRequest:
    """The answer to "I need this blueprint for this layer": a kernel now, or a compile job."""

    blueprint_id: str
    kernel: KernelMetadata | None = None
    job: CompileJob | None = None

    @property
    def ready(self) -> bool:
        """Whether a compiled kernel is already in the library."""
        return self.kernel is not None


def find_or_enqueue(
    library: ArtifactLibrary, spec: BlueprintSpec, target: KernelTarget, *, init_seed: int = 0
) -> KernelRequest:
    """Find a kernel compiled from ``spec`` for ``target`` (same geometry, device, dtype and seed),
    or enqueue a compile job (deduplicated by the library) and return it.

    Raises:
        BlueprintValidationError: the blueprint was already found invalid.
    """
    record = library.submit_blueprint(spec)
    if record.status is BlueprintStatus.INVALID:
        raise BlueprintValidationError(spec, target, record.reason or "marked invalid")
    matches = [
        kernel
        for kernel in library.find_kernels(
            blueprint_id=record.blueprint_id,
            target=target,
            device=target.device,
            dtype=target.dtype,
        )
        if kernel.init_seed == init_seed
    ]
    if matches:
        return KernelRequest(blueprint_id=record.blueprint_id, kernel=matches[0])
    job = library.enqueue_job(record.blueprint_id, target, init_seed=init_seed)
    return KernelRequest(blueprint_id=record.blueprint_id, job=job)
