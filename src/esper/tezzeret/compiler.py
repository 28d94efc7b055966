"""The blueprint compiler: build, validate, characterize and serialize one kernel.

``compile_blueprint(spec, target)``:

1. **build** the module with the family's builder, initialised deterministically from
   ``init_seed`` and function-preserving (its output is exactly zero);
2. **validate** it: forward on several batch sizes (output shape, finite values, exact zero),
   backward (finite gradients on every parameter), and ``torch.export`` (a single graph, no
   breaks), the last recorded as a capability rather than a requirement;
3. **characterize** it: parameter count, bytes, median latency on the target device, FLOPs per
   sample (``torch.utils.flop_counter``);
4. **serialize** it to the artifact format of :mod:`esper.blueprints.artifact`: the same
   blueprint, target and seed always give the same bytes and so the same kernel id.

A validation failure raises :class:`BlueprintValidationError` with the reason.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from esper.blueprints import build_kernel, describe_artifact, encode_artifact, torch_dtype
from esper.contracts import BlueprintSpec, KernelCharacterization, KernelMetadata, KernelTarget
from esper.contracts.bounds import text_within_bounds
from esper.errors import BlueprintError, EsperError

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 3, 32)
_SPATIAL_SIZES = {0: (), 1: (16,), 2: (8, 8)}


class BlueprintValidationError(EsperError):
    """A blueprint failed validation for its target; ``reason`` says which check and why."""

    def __init__(self, spec: BlueprintSpec, target: KernelTarget, reason: str) -> None:
        super().__init__(
            f"blueprint {spec.family} {spec.canonical_json()} is invalid for {target.describe()}: "
            f"{reason}"
        )
        self.reason = reason


@dataclass(frozen=True)
class CompiledKernel:
    """A compiled kernel: the artifact bytes and their metadata (with characterization)."""

    artifact: bytes
    metadata: KernelMetadata

    @property
    def kernel_id(self) -> str:
        """The artifact's content address."""
        return self.metadata.kernel_id


def example_input(target: KernelTarget, batch_size: int) -> torch.Tensor:
    """A random input of the layout a kernel for ``target`` reads, on its device and dtype."""
    channels = (target.in_features,)
    spatial = _SPATIAL_SIZES[target.spatial_dims]
    shape = (
        (batch_size, *channels, *spatial) if target.channel_dim == 1 else (batch_size, *channels)
    )
    generator = torch.Generator().manual_seed(batch_size)
    x = torch.randn(shape, generator=generator)
    return x.to(device=target.device, dtype=torch_dtype(target.dtype))


def _expected_shape(target: KernelTarget, batch_size: int) -> tuple[int, ...]:
    spatial = _SPATIAL_SIZES[target.spatial_dims]
    if target.channel_dim == 1:
        return (batch_size, target.out_features, *spatial)
    return (batch_size, target.out_features)


def _validate(
    module: nn.Module, spec: BlueprintSpec, target: KernelTarget, batch_sizes: Sequence[int]
) -> None:
    def fail(reason: str) -> BlueprintValidationError:
        return BlueprintValidationError(spec, target, reason)

    for batch_size in batch_sizes:
        x = example_input(target, batch_size)
        try:
            y = module(x)
        except Exception as exc:
            raise fail(f"forward on batch size {batch_size} raised {exc!r}") from exc
        expected = _expected_shape(target, batch_size)
        if tuple(y.shape) != expected:
            raise fail(f"forward gave shape {tuple(y.shape)}, expected {expected}")
        if not torch.isfinite(y).all():
            raise fail(f"forward on batch size {batch_size} produced non-finite values")
        if y.abs().max() != 0:
            raise fail("a freshly built kernel must output exactly zero (function-preserving)")
    x = example_input(target, max(batch_sizes))
    module.zero_grad(set_to_none=True)
    y = module(x)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(0)).to(y)
    (y * weights).sum().backward()  # a private generator: compiles never touch the global RNG
    for name, param in module.named_parameters():
        if param.grad is None:
            continue
        if not torch.isfinite(param.grad).all():
            raise fail(f"backward produced non-finite gradients for parameter {name!r}")
    module.zero_grad(set_to_none=True)


def _export_capability(module: nn.Module, target: KernelTarget) -> str | None:
    """``None`` if ``torch.export`` captures the kernel as one graph, else why not."""
    try:
        torch.export.export(module, (example_input(target, 4),))
    except Exception as exc:  # export raises many types; any means "not exportable"
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        return text_within_bounds(f"{type(exc).__name__}: {first_line}", limit=2000)
    return None


def _characterize(
    module: nn.Module, target: KernelTarget, batch_sizes: Sequence[int], latency_trials: int
) -> KernelCharacterization:
    x = example_input(target, 32)
    with torch.no_grad():
        with FlopCounterMode(display=False) as flops:
            module(example_input(target, 1))
        for _ in range(3):
            module(x)
        timings = []
        for _ in range(latency_trials):
            started = time.perf_counter()
            module(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            timings.append((time.perf_counter() - started) * 1e6)
    export_error = _export_capability(module, target)
    return KernelCharacterization(
        device=target.device,
        latency_us_median=statistics.median(timings),
        flops_per_sample=int(flops.get_total_flops()),
        batch_sizes_validated=tuple(batch_sizes),
        exportable=export_error is None,
        export_error=export_error,
    )


def compile_blueprint(
    spec: BlueprintSpec,
    target: KernelTarget,
    *,
    init_seed: int = 0,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    latency_trials: int = 20,
) -> CompiledKernel:
    """Compile ``spec`` for ``target`` into a validated, characterized kernel artifact.

    Args:
        spec: the blueprint.
        target: the host layer geometry, dtype and device to build and measure for.
        init_seed: seed of the kernel's initialisation (part of the artifact's identity).
        batch_sizes: batch sizes the forward is validated on.
        latency_trials: forwards timed for the latency median (batch 32).

    Raises:
        BlueprintValidationError: the blueprint is unknown, incompatible with the target, or
            failed a validation check.
    """
    started = time.perf_counter()
    try:
        module = build_kernel(spec, target, init_seed=init_seed, device=target.device)
    except BlueprintError as exc:
        raise BlueprintValidationError(spec, target, str(exc)) from exc
    artifact = encode_artifact(module, spec, target, init_seed=init_seed)
    _validate(module, spec, target, batch_sizes)
    characterization = _characterize(module, target, batch_sizes, latency_trials)
    metadata = describe_artifact(artifact).model_copy(update={"characterization": characterization})
    logger.info(
        "compiled %s for %s: kernel %s, %d parameters, %.0f us, %.0f ms",
        spec.family,
        target.describe(),
        metadata.kernel_id[:12],
        metadata.parameter_count,
        characterization.latency_us_median,
        (time.perf_counter() - started) * 1e3,
    )
    return CompiledKernel(artifact=artifact, metadata=metadata)
