"""Seed checkpoints: a layer's slice of a state dict, checked before anything is allocated.

Per grafted seed a state dict holds the kernel's spec bytes (``seeds.<i>.spec``) and its tensors
(``seeds.<i>.kernel.*``), next to the seed layout's buffers (``seed_state.*``). All of it comes from
outside, so before any real memory is allocated or any state changes, :func:`check_layer_slice`

* decodes each spec (bounded in size) and compares its target geometry with the layer's;
* builds the kernel on the meta device and compares every tensor name and shape with the
  checkpoint's (a spec edited to ``hidden=65536`` no longer matches its 8-wide weights);
* checks the seed layout's buffers: known lifecycle states, a kernel for every seed that runs one,
  alphas within ``[0, 1]``, non-negative counters.

A failed check raises :class:`~esper.errors.StateDictError` naming the key and the fix. Only then
does :func:`build_restored_kernels` build the kernels for real (for the layer's geometry).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from esper.blueprints import build_empty_kernel, build_kernel
from esper.contracts import BlueprintSpec, KernelTarget, SeedState
from esper.errors import ArtifactFormatError, BlueprintError, StateDictError
from esper.execution.grafted_kernel import GraftedKernel, decode_spec
from esper.execution.state_layout import KERNEL_ID_BYTES, SEED_LAYOUT_KEY

_SPEC_KEY = re.compile(r"seeds\.(0|[1-9][0-9]{0,5})\.spec")
"""A seed's spec key inside a layer's prefix; anything else is left to ``load_state_dict``."""

_COUNTERS = ("error_count", "retry_after_step", "blend_steps")


@dataclass(frozen=True)
class RestoredSeed:
    """A seed kernel found in a checkpoint, checked against its layer but not yet built."""

    seed_idx: int
    spec: BlueprintSpec
    recorded_target: KernelTarget
    """The target stored with the spec (kept so the spec bytes round-trip unchanged)."""


def check_layer_slice(
    state_dict: Mapping[str, Any],
    prefix: str,
    *,
    layer_name: str,
    num_seeds: int,
    target: KernelTarget,
) -> dict[int, RestoredSeed]:
    """Check a layer's slice of ``state_dict`` (keys under ``prefix``); nothing is allocated.

    Args:
        state_dict: the whole state dict being loaded.
        prefix: the layer's key prefix (``"model.encoder.fc1."``).
        layer_name: for messages.
        num_seeds: the layer's seed count.
        target: the layer's kernel geometry, in the layer's dtype.

    Returns:
        The seeds that hold a kernel in the checkpoint, by index.

    Raises:
        StateDictError: a spec, a kernel tensor or a seed layout buffer is malformed or does not
            fit the layer.
    """
    restored: dict[int, RestoredSeed] = {}
    for key, raw in state_dict.items():
        match = _SPEC_KEY.fullmatch(key[len(prefix) :]) if key.startswith(prefix) else None
        if match is None:
            continue
        seed_idx = int(match.group(1))
        where = f"layer {layer_name!r} seed {seed_idx} ({key})"
        if seed_idx >= num_seeds:
            raise StateDictError(
                f"{where}: the checkpoint holds a kernel for seed {seed_idx} but the layer has "
                f"{num_seeds} seeds; wrap the model with seeds_per_layer >= {seed_idx + 1}"
            )
        try:
            spec, recorded = decode_spec(raw)
        except ArtifactFormatError as exc:
            raise StateDictError(f"{where}: {exc}") from None
        if not target.same_geometry(recorded):
            raise StateDictError(
                f"{where}: the kernel was built for {recorded.describe()} but the layer is "
                f"{target.describe()}; load the checkpoint into the model it was saved from"
            )
        try:
            meta_kernel = build_empty_kernel(spec, target)  # structure only: no memory
        except BlueprintError as exc:
            raise StateDictError(
                f"{where}: the kernel's blueprint cannot be built: {exc}"
            ) from None
        _check_kernel_tensors(
            meta_kernel.state_dict(), state_dict, f"{prefix}seeds.{seed_idx}.kernel.", where
        )
        restored[seed_idx] = RestoredSeed(seed_idx, spec, recorded)
    _check_seed_buffers(state_dict, f"{prefix}{SEED_LAYOUT_KEY}.", num_seeds, restored, layer_name)
    return restored


def build_restored_kernels(
    restored: Mapping[int, RestoredSeed], target: KernelTarget, device: torch.device | str
) -> dict[int, GraftedKernel]:
    """Build the checked kernels for real, in the layer's dtype on ``device`` (their weights are
    then overwritten by the checkpoint's)."""
    return {
        seed_idx: GraftedKernel(
            build_kernel(seed.spec, target, device=device), seed.spec, seed.recorded_target
        )
        for seed_idx, seed in restored.items()
    }


def _check_kernel_tensors(
    expected: Mapping[str, torch.Tensor],
    state_dict: Mapping[str, Any],
    prefix: str,
    where: str,
) -> None:
    found = {key[len(prefix) :] for key in state_dict if key.startswith(prefix)}
    if found != set(expected):
        missing = sorted(set(expected) - found)
        extra = sorted(found - set(expected))
        raise StateDictError(
            f"{where}: the kernel's tensors do not match its blueprint (missing: {missing or '-'}, "
            f"unexpected: {extra or '-'}); the checkpoint is damaged or was edited"
        )
    for name, reference in expected.items():
        tensor = state_dict[prefix + name]
        if not isinstance(tensor, torch.Tensor):
            raise StateDictError(
                f"{where}: {prefix + name} is a {type(tensor).__name__}, not a tensor"
            )
        if tuple(tensor.shape) != tuple(reference.shape):
            raise StateDictError(
                f"{where}: {prefix + name} has shape {tuple(tensor.shape)} but the kernel's "
                f"blueprint needs {tuple(reference.shape)}; the checkpoint is damaged or was edited"
            )
        if tensor.is_floating_point() != reference.is_floating_point():
            raise StateDictError(
                f"{where}: {prefix + name} is {tensor.dtype} but the kernel's blueprint needs "
                f"{reference.dtype}"
            )


def _buffer(state_dict: Mapping[str, Any], key: str, shape: tuple[int, ...]) -> list[Any] | None:
    """The buffer's values (``None`` if the key is absent: a partial load), shape-checked."""
    if key not in state_dict:
        return None
    value = state_dict[key]
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
        described = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise StateDictError(f"{key} must be a tensor of shape {shape}, got {described}")
    return value.flatten().tolist()


def _check_seed_buffers(
    state_dict: Mapping[str, Any],
    prefix: str,
    num_seeds: int,
    restored: Mapping[int, RestoredSeed],
    layer_name: str,
) -> None:
    lifecycle = _buffer(state_dict, prefix + "lifecycle", (num_seeds,))
    for seed_idx, value in enumerate(lifecycle or ()):
        try:
            state = SeedState(int(value))
        except ValueError:
            known = ", ".join(f"{s.value} ({s.name})" for s in SeedState)
            raise StateDictError(
                f"{prefix}lifecycle[{seed_idx}] is {value!r}, not a seed state ({known})"
            ) from None
        if state.runs_kernel and seed_idx not in restored:
            raise StateDictError(
                f"layer {layer_name!r} seed {seed_idx} is {state.name} in the checkpoint but the "
                f"checkpoint holds no kernel for it (no seeds.{seed_idx}.spec); the checkpoint is "
                "damaged or was edited"
            )
    alphas = _buffer(state_dict, prefix + "alpha", (num_seeds,))
    for seed_idx, alpha in enumerate(alphas or ()):
        if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
            raise StateDictError(f"{prefix}alpha[{seed_idx}] is {alpha}; alphas lie within [0, 1]")
    _buffer(state_dict, prefix + "kernel_id", (num_seeds, KERNEL_ID_BYTES))
    for name in _COUNTERS:
        for seed_idx, count in enumerate(_buffer(state_dict, prefix + name, (num_seeds,)) or ()):
            if not count >= 0:
                raise StateDictError(
                    f"{prefix}{name}[{seed_idx}] is {count}; it cannot be negative"
                )
