"""Model wrapping: ``esper.wrap`` turns a model into a :class:`MorphableModel` with seeded layers.

Targeted layers are swapped in place for :class:`~esper.execution.KasminaLayer` wrappers (with
``setattr`` on their parents, as PEFT does); everything Esper injects lives under ``seed_state``
and ``seeds`` inside those wrappers, so selecting kernel parameters or filtering a state dict is
a string test. With every seed dormant the wrapped model computes exactly what the original did.
"""

from __future__ import annotations

import asyncio
import copy
import difflib
import logging
import re
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from typing import Any, Protocol

import torch
from torch import nn

from esper.contracts import HealthSignal, ModelStats, SeedState
from esper.errors import ConfigurationError, KernelLoadError, UnknownLayerError
from esper.execution import (
    SUPPORTED_LAYER_TYPES,
    CachedKernel,
    KasminaLayer,
    KernelCache,
)
from esper.execution.artifact_sources import ArtifactSource
from esper.execution.kasmina_layer import has_hooks

logger = logging.getLogger(__name__)

TargetSpec = type[nn.Module] | str | re.Pattern[str]
"""A layer selector: a module type, a qualified name (or ``.suffix``), or a compiled regex."""

FUSED_INFERENCE_MODULES: tuple[type[nn.Module], ...] = (nn.TransformerEncoderLayer,)
"""Modules whose inference fast path reads their children's weights instead of calling them."""

KernelListener = Callable[[str, int, nn.Module], None]
"""``listener(layer_name, seed_idx, kernel_module)``, called when a kernel joins or leaves."""


class TelemetrySink(Protocol):
    """Where :meth:`MorphableModel.collect_telemetry` sends each batch of health signals."""

    def publish(self, signals: Sequence[HealthSignal]) -> None:
        """Deliver one flush of signals; must not block the training thread."""
        ...


class MorphableModel(nn.Module):
    """A model whose targeted layers carry seeds; built by :func:`wrap`.

    Calling it runs the wrapped model unchanged (``forward`` is bound to the wrapped model's
    ``forward``). Lifecycle calls address layers by their dotted names in the original model.

    Args:
        model: the model whose layers were already replaced by :class:`KasminaLayer` wrappers.
        layers: the wrappers by dotted name (aliases of a shared module map to one wrapper).
        kernel_cache: the cache all layers load kernels through.
        telemetry_sink: optional receiver of :meth:`collect_telemetry` results.
    """

    morph_step: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, KasminaLayer],
        *,
        kernel_cache: KernelCache,
        telemetry_sink: TelemetrySink | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("morph_step", torch.zeros((), dtype=torch.int64))
        self._layers = dict(layers)
        self.kernel_cache = kernel_cache
        self.telemetry_sink = telemetry_sink
        self._graft_listeners: list[KernelListener] = []
        self._remove_listeners: list[KernelListener] = []
        self._step = 0
        for layer in self._unique_layers():
            layer.attach(kernel_cache, self)
        self._bind_forward()
        self.register_load_state_dict_post_hook(MorphableModel._after_state_dict_load)

    def _bind_forward(self) -> None:
        """Call the wrapped model's ``forward`` directly (no extra module call per forward)."""
        forward = self.model if has_hooks(self.model) else self.model.forward
        object.__setattr__(self, "forward", forward)  # not registered as a child module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped model (normally replaced by the bound fast path)."""
        return self.model(*args, **kwargs)

    # -- registry ------------------------------------------------------------------------------

    @property
    def layers(self) -> Mapping[str, KasminaLayer]:
        """Seeded layers by their dotted name in the original model."""
        return self._layers

    @property
    def layer_names(self) -> list[str]:
        """Names of the seeded layers, in model order (one name per wrapped module)."""
        return [layer.layer_name for layer in self._unique_layers()]

    def layer(self, name: str) -> KasminaLayer:
        """The seeded layer ``name``; :class:`UnknownLayerError` with suggestions if none."""
        try:
            return self._layers[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._layers), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UnknownLayerError(
                f"no seeded layer named {name!r}.{hint} Seeded layers: "
                f"{', '.join(self.layer_names) or 'none'}"
            ) from None

    def _unique_layers(self) -> Iterator[KasminaLayer]:
        seen: set[int] = set()
        for layer in self._layers.values():
            if id(layer) not in seen:
                seen.add(id(layer))
                yield layer

    # -- lifecycle -----------------------------------------------------------------------------

    def request_kernel(
        self, layer_name: str, *, seed_idx: int, kernel_artifact_id: str
    ) -> Future[CachedKernel]:
        """Start loading a kernel into a dormant seed and return at once.

        The seed is LOADING until the load finishes; the kernel is grafted (-> BLENDING) at the
        next :meth:`step`. Errors surface through the returned future.
        """
        return self.layer(layer_name).request_kernel(seed_idx, kernel_artifact_id)

    async def load_kernel(
        self, layer_name: str, *, seed_idx: int, kernel_artifact_id: str
    ) -> nn.Module:
        """Load a kernel into a seed and graft it; returns the kernel module once it is BLENDING.

        The fetch runs on the kernel cache's threads; awaiting never blocks the event loop.

        Raises:
            KernelLoadError: fetching, verifying or grafting failed; the seed is DORMANT again.
        """
        layer = self.layer(layer_name)
        future = layer.request_kernel(seed_idx, kernel_artifact_id)
        await asyncio.wait({asyncio.wrap_future(future)})  # success or failure: both finish
        return self._finish_load(layer, seed_idx, future)

    def load_kernel_sync(
        self,
        layer_name: str,
        *,
        seed_idx: int,
        kernel_artifact_id: str,
        timeout: float | None = 60.0,
    ) -> nn.Module:
        """Blocking form of :meth:`load_kernel`, for scripts without an event loop."""
        layer = self.layer(layer_name)
        future = layer.request_kernel(seed_idx, kernel_artifact_id)
        _, not_done = futures_wait([future], timeout=timeout)
        if not_done:
            layer.unload(seed_idx)
            raise KernelLoadError(
                f"loading kernel {kernel_artifact_id} into {layer_name!r} seed {seed_idx} took "
                f"longer than {timeout}s; the seed is DORMANT again"
            )
        return self._finish_load(layer, seed_idx, future)

    def _finish_load(
        self, layer: KasminaLayer, seed_idx: int, future: Future[CachedKernel]
    ) -> nn.Module:
        layer.complete_load(seed_idx)
        exc = future.exception() or layer.last_errors.get(seed_idx)
        module = layer.kernel(seed_idx)
        if module is None or layer.seed_state.slots[seed_idx].state is SeedState.DORMANT:
            raise KernelLoadError(
                f"could not load a kernel into layer {layer.layer_name!r} seed {seed_idx}: {exc}; "
                "the seed is DORMANT and training can continue"
            ) from exc
        return module

    def unload_kernel(self, layer_name: str, *, seed_idx: int) -> None:
        """Cull a seed's kernel (back to DORMANT)."""
        self.layer(layer_name).unload(seed_idx)

    def fossilize(self, layer_name: str, *, seed_idx: int) -> None:
        """Keep an ACTIVE seed's kernel permanently."""
        self.layer(layer_name).fossilize(seed_idx)

    def set_seed_alpha(self, layer_name: str, *, seed_idx: int, alpha: float) -> None:
        """Override the blend weight of a seed holding a kernel."""
        self.layer(layer_name).set_alpha(seed_idx, alpha)

    def seed_state(self, layer_name: str, seed_idx: int) -> SeedState:
        """Current lifecycle state of one seed."""
        layer = self.layer(layer_name)
        layer._check_seed(seed_idx)
        return layer.seed_states[seed_idx]

    def step(self, *, graftable: Mapping[str, Collection[int]] | None = None) -> int:
        """Step boundary (call after each optimizer step): graft finished loads, ramp alphas,
        retry faulted seeds, arm health sampling. Returns the new step number.

        Args:
            graftable: per layer name, the seeds whose finished loads may be grafted at this
                boundary (``None``: every finished load). Lockstep training uses it so that all
                ranks graft at the same step.
        """
        self._step += 1
        self.morph_step.fill_(self._step)
        for layer in self._unique_layers():
            allowed = None if graftable is None else graftable.get(layer.layer_name, ())
            layer.advance(self._step, graftable=allowed)
        return self._step

    def pending_loads(self) -> list[tuple[str, int, bool]]:
        """``(layer_name, seed_idx, finished)`` for every load in flight, in model order."""
        return [
            (layer.layer_name, seed_idx, finished)
            for layer in self._unique_layers()
            for seed_idx, finished in layer.pending_loads().items()
        ]

    @property
    def global_step(self) -> int:
        """Number of :meth:`step` calls so far (restored by ``load_state_dict``)."""
        return self._step

    # -- optimizer integration -----------------------------------------------------------------

    def on_kernel_grafted(self, listener: KernelListener) -> None:
        """Call ``listener(layer_name, seed_idx, module)`` whenever a kernel is grafted."""
        self._graft_listeners.append(listener)

    def on_kernel_removed(self, listener: KernelListener) -> None:
        """Call ``listener(layer_name, seed_idx, module)`` whenever a kernel is removed."""
        self._remove_listeners.append(listener)

    def kernel_grafted(self, layer_name: str, seed_idx: int, module: nn.Module) -> None:
        """(:class:`~esper.execution.kasmina_layer.SeedEvents`) fan a graft out to listeners."""
        for listener in self._graft_listeners:
            listener(layer_name, seed_idx, module)

    def kernel_removed(self, layer_name: str, seed_idx: int, module: nn.Module) -> None:
        """(:class:`~esper.execution.kasmina_layer.SeedEvents`) fan a removal out to listeners."""
        for listener in self._remove_listeners:
            listener(layer_name, seed_idx, module)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, **group_options: Any) -> None:
        """Keep ``optimizer`` in step with grafts: each kernel gets its own parameter group
        (tagged ``esper_seed="<layer>:<seed>"``, with ``group_options`` such as ``lr``), removed
        with its optimizer state when the kernel is removed."""

        def add_group(layer_name: str, seed_idx: int, module: nn.Module) -> None:
            params = [p for p in module.parameters() if p.requires_grad]
            tag = f"{layer_name}:{seed_idx}"
            optimizer.add_param_group({"params": params, "esper_seed": tag, **group_options})

        def remove_group(layer_name: str, seed_idx: int, module: nn.Module) -> None:
            tag = f"{layer_name}:{seed_idx}"
            for group in [g for g in optimizer.param_groups if g.get("esper_seed") == tag]:
                for param in group["params"]:
                    optimizer.state.pop(param, None)
                # by identity: list.remove compares groups with ==, i.e. their tensors elementwise
                optimizer.param_groups[:] = [g for g in optimizer.param_groups if g is not group]

        self.on_kernel_grafted(add_group)
        self.on_kernel_removed(remove_group)

    def base_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the original model (everything but grafted kernels)."""
        for name, param in self.model.named_parameters():
            if not _is_seed_name(name):
                yield param

    def kernel_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of grafted kernels."""
        for name, param in self.model.named_parameters():
            if _is_seed_name(name):
                yield param

    # -- telemetry and statistics --------------------------------------------------------------

    def collect_telemetry(
        self, *, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> list[HealthSignal]:
        """Read every layer's health accumulators in one device transfer and reset them.

        Seeds whose kernels produced non-finite output in the window are quarantined (moved to
        ERROR_RECOVERY). The signals are also published to the telemetry sink, if any.

        Args:
            reduce: applied to the flat accumulator tensor before it is read, e.g. an all-reduce
                mean across ranks so every rank quarantines the same seeds.
        """
        layers = list(self._unique_layers())
        if not layers:
            return []
        accumulators = torch.cat([layer.health_tensor() for layer in layers])
        if reduce is not None:
            accumulators = reduce(accumulators)
        flat = accumulators.tolist()  # one transfer
        now = time.time()
        signals = []
        offset = 0
        for layer in layers:
            size = KasminaLayer.health_tensor_size(layer.num_seeds)
            signals.append(
                layer.health_signal(flat[offset : offset + size], step=self._step, timestamp=now)
            )
            offset += size
        if self.telemetry_sink is not None:
            self.telemetry_sink.publish(signals)
        return signals

    def stats(self) -> ModelStats:
        """Parameter counts, seed states per layer, and kernel cache statistics."""
        layer_stats = tuple(layer.stats() for layer in self._unique_layers())
        totals = dict.fromkeys(SeedState, 0)
        for stats in layer_stats:
            for state, count in stats.seeds_by_state.items():
                totals[state] += count
        return ModelStats(
            layers=layer_stats,
            base_parameters=sum(p.numel() for p in self.base_parameters()),
            kernel_parameters=sum(p.numel() for p in self.kernel_parameters()),
            seeds_by_state=totals,
            cache=self.kernel_cache.stats(),
        )

    # -- unwrapping and checkpoints ------------------------------------------------------------

    def unwrap(self) -> nn.Module:
        """A plain copy of the model that computes what this one computes now.

        Dormant layers become their base module again; a Linear layer whose running kernels are
        all linear (``lowrank_adapter`` with the identity activation) gets them merged into its
        weights (exact up to float rounding); any other layer with running kernels becomes a
        :class:`~esper.core.frozen_graft.FrozenGraft` (base + fixed-alpha kernels).
        """
        from esper.core.frozen_graft import freeze_layer

        plain = copy.deepcopy(self).model
        replacements = {
            id(module): freeze_layer(module)
            for module in plain.modules()
            if isinstance(module, KasminaLayer)
        }
        _replace_modules(plain, replacements)
        return plain

    def _after_state_dict_load(self, incompatible_keys: Any) -> None:
        self._step = int(self.morph_step.item())


def _is_seed_name(name: str) -> bool:
    return ".seeds." in f".{name}"


def _replace_modules(root: nn.Module, replacements: Mapping[int, nn.Module]) -> None:
    """Swap every occurrence of a module (by ``id``) for its replacement, at every parent."""
    for parent in list(root.modules()):
        # not named_children(): it yields a child registered twice under one parent only once
        for child_name, child in list(parent._modules.items()):
            replacement = replacements.get(id(child))
            if replacement is not None:
                setattr(parent, child_name, replacement)


def _select_targets(
    model: nn.Module, target_layers: TargetSpec | Iterable[TargetSpec] | None
) -> dict[int, list[str]]:
    """Modules to wrap, as ``id(module) -> every dotted name it appears under``, in model order.

    Raises:
        UnknownLayerError: a name or regex matches no module (the message lists candidates).
        ConfigurationError: a named module's type cannot carry seeds.
    """
    sites: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    inside_attention: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if not name:
            continue
        sites.setdefault(id(module), []).append(name)
        modules[id(module)] = module
        if isinstance(module, nn.MultiheadAttention):
            inside_attention.update(id(m) for m in module.modules() if m is not module)

    def supported(module: nn.Module) -> bool:
        return isinstance(module, SUPPORTED_LAYER_TYPES) and id(module) not in inside_attention

    if target_layers is None:
        selectors: list[TargetSpec] = list(SUPPORTED_LAYER_TYPES)
    elif isinstance(target_layers, str | re.Pattern | type):
        selectors = [target_layers]
    else:
        selectors = list(target_layers)

    chosen: set[int] = set()
    for selector in selectors:
        matched = _match(selector, sites, modules)
        if isinstance(selector, type):
            chosen.update(key for key in matched if supported(modules[key]))
            continue
        if not matched:
            names = [n for key, ns in sites.items() if supported(modules[key]) for n in ns]
            close = difflib.get_close_matches(str(getattr(selector, "pattern", selector)), names, 3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UnknownLayerError(
                f"target {selector!r} matches no module of the model.{hint} Layers that can carry "
                f"seeds: {', '.join(names) or 'none'}"
            )
        for key in matched:
            module = modules[key]
            if not supported(module):
                why = (
                    "it is part of a MultiheadAttention (target the attention module instead)"
                    if key in inside_attention
                    else f"it is a {type(module).__name__}"
                )
                supported_names = ", ".join(t.__name__ for t in SUPPORTED_LAYER_TYPES)
                raise ConfigurationError(
                    f"layer {sites[key][0]!r} cannot carry seeds: {why}. Supported layer types: "
                    f"{supported_names}"
                )
            chosen.add(key)
    if not chosen:
        raise UnknownLayerError(
            f"no layer of the model matches target_layers={target_layers!r}; supported layer "
            f"types: {', '.join(t.__name__ for t in SUPPORTED_LAYER_TYPES)}"
        )
    return {key: names for key, names in sites.items() if key in chosen}


def _match(
    selector: TargetSpec, sites: Mapping[int, list[str]], modules: Mapping[int, nn.Module]
) -> list[int]:
    if isinstance(selector, type):
        if not issubclass(selector, nn.Module):
            raise ConfigurationError(f"target type {selector!r} is not an nn.Module subclass")
        return [key for key, module in modules.items() if isinstance(module, selector)]
    if isinstance(selector, re.Pattern):
        return [key for key, names in sites.items() if any(selector.fullmatch(n) for n in names)]
    if isinstance(selector, str):
        suffix = selector[1:] if selector.startswith(".") else selector
        return [
            key
            for key, names in sites.items()
            if any(n == suffix or n.endswith("." + suffix) for n in names)
        ]
    raise ConfigurationError(
        f"target_layers entries must be module types, names or compiled regexes, got {selector!r}"
    )


def wrap(
    model: nn.Module,
    target_layers: TargetSpec | Iterable[TargetSpec] | None = None,
    seeds_per_layer: int = 4,
    *,
    inplace: bool = False,
    kernel_source: ArtifactSource | None = None,
    kernel_cache: KernelCache | None = None,
    telemetry_sink: TelemetrySink | None = None,
    blend_steps: int = 20,
    max_retries: int = 3,
    retry_backoff_steps: int = 10,
    health_every: int = 10,
) -> MorphableModel:
    """Give the targeted layers of ``model`` dormant seeds; the result computes exactly as before.

    Args:
        model: any ``nn.Module``.
        target_layers: which layers get seeds: module types (``nn.Linear``), dotted names or
            ``.suffix`` names (``"encoder.fc1"``, ``".fc1"``), compiled regexes matched against
            full dotted names, or a list mixing them. ``None``: every supported layer.
        seeds_per_layer: seeds per targeted layer.
        inplace: modify ``model`` itself instead of a deep copy of it.
        kernel_source: where kernel artifacts are fetched from (folder, memory, Urza).
        kernel_cache: a cache to share with other models; by default one is created on the
            model's device and shared by all of this model's layers.
        telemetry_sink: receiver of :meth:`MorphableModel.collect_telemetry` results.
        blend_steps: steps over which a grafted kernel's alpha ramps from 0 to 1.
        max_retries: kernel faults tolerated per seed before it gives up.
        retry_backoff_steps: steps before a faulted kernel's first retry (doubling after each).
        health_every: record layer health on one forward every this many steps (0: never).

    Raises:
        UnknownLayerError: a target name or regex matches nothing.
        ConfigurationError: a named target cannot carry seeds, or a setting is invalid.
    """
    if isinstance(model, MorphableModel):
        raise ConfigurationError("the model is already wrapped; call unwrap() first")
    if seeds_per_layer < 1:
        raise ConfigurationError(f"seeds_per_layer must be >= 1, got {seeds_per_layer}")
    targets = _select_targets(model, target_layers)
    if not inplace:
        model = copy.deepcopy(model)
        targets = _select_targets(model, [n for names in targets.values() for n in names])
    modules = dict(model.named_modules(remove_duplicate=False))
    inside_fused = {
        id(child)
        for module in model.modules()
        if isinstance(module, FUSED_INFERENCE_MODULES)
        for child in module.modules()
    }
    replacements: dict[int, nn.Module] = {}
    layers: dict[str, KasminaLayer] = {}
    for key, names in targets.items():
        layer = KasminaLayer(
            modules[names[0]],
            num_seeds=seeds_per_layer,
            layer_name=names[0],
            blend_steps=blend_steps,
            max_retries=max_retries,
            retry_backoff_steps=retry_backoff_steps,
            health_every=health_every,
            inside_fused_module=key in inside_fused,
        )
        replacements[key] = layer
        layers.update(dict.fromkeys(names, layer))
    _replace_modules(model, replacements)
    if kernel_cache is None:
        reference = next(iter((*model.parameters(), *model.buffers())), None)
        device = reference.device if reference is not None else torch.device("cpu")
        kernel_cache = KernelCache(kernel_source, device=device)
    elif kernel_source is not None:
        kernel_cache.set_source(kernel_source)
    return MorphableModel(model, layers, kernel_cache=kernel_cache, telemetry_sink=telemetry_sink)


def unwrap(model: MorphableModel) -> nn.Module:
    """A plain model computing what ``model`` computes now (see :meth:`MorphableModel.unwrap`)."""
    if not isinstance(model, MorphableModel):
        raise ConfigurationError(
            f"unwrap expects a MorphableModel returned by esper.wrap, got {type(model).__name__}"
        )
    return model.unwrap()
