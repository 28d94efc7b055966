"""Model wrapping: ``esper.wrap`` turns a model into a :class:`MorphableModel` with seeded layers.

Targeted layers are swapped in place for :class:`~esper.execution.KasminaLayer` wrappers (with
``setattr`` on their parents, as PEFT does); everything Esper injects lives under the keys
``seed_state.`` (the seed layout) and ``seeds.`` inside those wrappers, so selecting kernel
parameters or filtering a state dict is a string test. With every seed dormant the wrapped model
computes exactly what the original did. Per-layer settings: :mod:`esper.core.layer_settings`;
defaults (the user's kernel library, telemetry by URL): :mod:`esper.core.sdk_defaults`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from esper.core.layer_selection import (
    TargetSpec,
    modules_inside_fused,
    replace_modules,
    select_targets,
)
from esper.core.layer_settings import check_layer_settings, settings_for_layers
from esper.core.morphable_model import Closable, MorphableModel, TelemetrySink
from esper.core.sdk_defaults import DefaultLibrarySource, telemetry_sink_for
from esper.errors import ArgumentTypeError, ConfigurationError
from esper.execution import KasminaLayer, KernelCache
from esper.execution.arguments import check_has_method, check_seed_settings, shown
from esper.execution.artifact_sources import ArtifactSource

logger = logging.getLogger(__name__)

__all__ = ["MorphableModel", "TargetSpec", "TelemetrySink", "unwrap", "wrap"]


def wrap(
    model: nn.Module,
    target_layers: TargetSpec | Iterable[TargetSpec] | None = None,
    seeds_per_layer: int = 4,
    *,
    inplace: bool = False,
    kernel_source: ArtifactSource | None = None,
    kernel_cache: KernelCache | None = None,
    telemetry: str | None = None,
    telemetry_sink: TelemetrySink | None = None,
    blend_steps: int = 20,
    max_retries: int = 3,
    retry_backoff_steps: int = 10,
    health_every: int = 10,
    layer_settings: Mapping[str, Mapping[str, int]] | None = None,
) -> MorphableModel:
    """Give the targeted layers of ``model`` dormant seeds; the result computes exactly as before.

    Args:
        model: any ``nn.Module``.
        target_layers: which layers get seeds: module types (``nn.Linear``), dotted names or
            ``.suffix`` names (``"encoder.fc1"``, ``".fc1"``), compiled regexes matched against
            full dotted names, or a list mixing them. ``None``: every supported layer.
        seeds_per_layer: seeds per targeted layer.
        inplace: modify ``model`` itself instead of a deep copy of it.
        kernel_source: where kernel artifacts are fetched from (folder, memory, Urza). With
            neither a source nor a cache: the user's default library (``ESPER_URZA_URL``, else
            the embedded one in ``ESPER_URZA_RUN_DIR``, default ``runs/urza``), opened on the
            first load (see :mod:`esper.core.sdk_defaults`).
        kernel_cache: a cache to share with other models; by default one is created on the
            model's device and shared by all of this model's layers.
        telemetry: a bus URL (``redis://host:6379/0``, ``memory://``): every
            :meth:`MorphableModel.collect_telemetry` flush is published to Oona's
            ``telemetry.health`` topic in the background. :meth:`MorphableModel.close` closes it.
        telemetry_sink: instead of ``telemetry``, any object with ``publish(signals)``.
        blend_steps: steps over which a grafted kernel's alpha ramps from 0 to 1.
        max_retries: kernel faults tolerated per seed before it gives up.
        retry_backoff_steps: steps before a faulted kernel's first retry (doubling after each).
        health_every: record layer health on one forward every this many steps (0: never).
        layer_settings: per-layer overrides of the five settings above, by layer name or
            ``.suffix``: ``{"encoder.fc1": {"seeds_per_layer": 8, "blend_steps": 5}}`` (see
            :mod:`esper.core.layer_settings`).

    Raises:
        UnknownLayerError: a target name, regex or ``layer_settings`` key matches nothing.
        ConfigurationError: a named target cannot carry seeds, or a setting is out of range
            (``seeds_per_layer`` at most :data:`~esper.execution.arguments.MAX_SEEDS_PER_LAYER`);
            :class:`~esper.errors.ArgumentTypeError` (also a ``TypeError``) for a wrong type.
            Nothing is changed when it raises.
    """
    if isinstance(model, MorphableModel):
        raise ConfigurationError("the model is already wrapped; call unwrap() first")
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(
            f"wrap() takes a torch.nn.Module, got {shown(model)} ({type(model).__name__})"
        )
    given = {
        "seeds_per_layer": seeds_per_layer,
        "blend_steps": blend_steps,
        "max_retries": max_retries,
        "retry_backoff_steps": retry_backoff_steps,
        "health_every": health_every,
    }
    settings = check_seed_settings(
        num_seeds=seeds_per_layer,
        blend_steps=blend_steps,
        max_retries=max_retries,
        retry_backoff_steps=retry_backoff_steps,
        health_every=health_every,
    )
    overrides = check_layer_settings(layer_settings or {}, given)
    if not isinstance(inplace, bool):
        raise ArgumentTypeError(f"inplace must be True or False, got {shown(inplace)}")
    if kernel_source is not None:
        check_has_method("kernel_source", kernel_source, "fetch")
    if kernel_cache is not None and not isinstance(kernel_cache, KernelCache):
        raise ArgumentTypeError(
            f"kernel_cache must be a KernelCache or None, got {shown(kernel_cache)}"
        )
    if telemetry_sink is not None:
        check_has_method("telemetry_sink", telemetry_sink, "publish")
    if telemetry is not None and not isinstance(telemetry, str):
        raise ArgumentTypeError(f"telemetry must be a bus URL or None, got {shown(telemetry)}")
    targets = select_targets(model, target_layers)
    per_layer = settings_for_layers(list(targets.values()), overrides, settings)
    if not inplace:
        model = copy.deepcopy(model)
        targets = select_targets(model, [n for names in targets.values() for n in names])
    sink = telemetry_sink_for(telemetry, telemetry_sink)  # the last step that can fail
    owned: list[Closable] = [sink] if telemetry is not None else []
    modules = dict(model.named_modules(remove_duplicate=False))
    inside_fused = modules_inside_fused(model)
    replacements: dict[int, nn.Module] = {}
    layers: dict[str, KasminaLayer] = {}
    for (key, names), layer_settings_ in zip(targets.items(), per_layer, strict=True):
        layer = KasminaLayer(
            modules[names[0]],
            layer_name=names[0],
            inside_fused_module=key in inside_fused,
            **layer_settings_,
        )
        replacements[key] = layer
        layers.update(dict.fromkeys(names, layer))
    replace_modules(model, replacements)
    if kernel_cache is None:
        source: Any = kernel_source
        if source is None:
            source = DefaultLibrarySource()
            owned.append(source)
        reference = next(iter((*model.parameters(), *model.buffers())), None)
        device = reference.device if reference is not None else torch.device("cpu")
        kernel_cache = KernelCache(source, device=device)
    elif kernel_source is not None:
        kernel_cache.set_source(kernel_source)
    return MorphableModel(
        model, layers, kernel_cache=kernel_cache, telemetry_sink=sink, owned=owned
    )


def unwrap(model: MorphableModel) -> nn.Module:
    """A plain model computing what ``model`` computes now (see :meth:`MorphableModel.unwrap`)."""
    if not isinstance(model, MorphableModel):
        raise ConfigurationError(
            f"unwrap expects a MorphableModel returned by esper.wrap, got {type(model).__name__}"
        )
    return model.unwrap()
