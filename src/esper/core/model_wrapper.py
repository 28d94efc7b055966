"""Model wrapping: ``esper.wrap`` turns a model into a :class:`MorphableModel` with seeded layers.

Targeted layers are swapped in place for :class:`~esper.execution.KasminaLayer` wrappers (with
``setattr`` on their parents, as PEFT does); everything Esper injects lives under the keys
``seed_state.`` (the seed layout) and ``seeds.`` inside those wrappers, so selecting kernel
parameters or filtering a state dict is a string test. With every seed dormant the wrapped model computes exactly what the original did.
"""

from __future__ import annotations

import asyncio
import copy
import difflib
import logging
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from typing import Any, Protocol

import torch
from torch import nn

from esper.contracts import HealthSignal, ModelStats, SeedState
from esper.core import optimizer_state
from esper.core.layer_selection import (
    TargetSpec,
    modules_inside_fused,
    replace_modules,
    select_targets,
)
from esper.core.optimizer_state import KernelListener
from esper.core.unwrap import unwrap_model
from esper.errors import ArgumentTypeError, ConfigurationError, KernelLoadError, UnknownLayerError
from esper.execution import CachedKernel, KasminaLayer, KernelCache
from esper.execution.arguments import (
    check_has_method,
    check_name,
    check_seed_settings,
    check_timeout,
    shown,
)
from esper.execution.artifact_sources import ArtifactSource
from esper.execution.fast_paths import has_hooks
from esper.execution.seed_checkpoint import check_layer_slice
from esper.operators.deepen_methods import DeepenMethods
from esper.operators.widen_api import WidenOperations

logger = logging.getLogger(__name__)

__all__ = ["MorphableModel", "TargetSpec", "TelemetrySink", "unwrap", "wrap"]


class TelemetrySink(Protocol):
    """Where :meth:`MorphableModel.collect_telemetry` sends each batch of health signals."""

    def publish(self, signals: Sequence[HealthSignal]) -> None:
        """Deliver one flush of signals; must not block the training thread."""
        ...


class MorphableModel(WidenOperations, DeepenMethods):
    """A model whose targeted layers carry seeds; built by :func:`wrap`.

    Calling it runs the wrapped model unchanged; lifecycle calls address layers by dotted names
    in the original model; loading calls take ``kernel_artifact_id=`` (Esper's ``kernel_id``).

    Args:
        model: the model whose layers were already replaced by :class:`KasminaLayer` wrappers.
        layers: the wrappers by dotted name (a shared module's aliases map to one wrapper).
        kernel_cache: the cache all layers load kernels through.
        telemetry_sink: optional receiver of :meth:`collect_telemetry` results.
    """

    morph_step: torch.Tensor
    plain_copy = staticmethod(unwrap_model)  # DEEPEN's plain-torch copy of a (seeded) block

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
        self._optimizers: list[torch.optim.Optimizer] = []
        self._step = 0
        for layer in self._unique_layers():
            layer.attach(kernel_cache, self)
        self._bind_forward()
        self.register_load_state_dict_pre_hook(MorphableModel._check_state_dict)
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
        check_name("layer name", name)
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
        timeout = check_timeout(timeout)
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
        seed_idx = layer._seed(seed_idx)
        layer.complete_load(seed_idx)
        exc = future.exception() or layer.last_errors.get(seed_idx)
        module = layer.kernel(seed_idx)
        if module is None or layer.seed_layout.slots[seed_idx].state is SeedState.DORMANT:
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
        return layer.seed_states[layer._seed(seed_idx)]

    def step(self, *, graftable: Mapping[str, Collection[int]] | None = None) -> int:
        """Step boundary (call after each optimizer step): graft finished loads, ramp alphas,
        retry faulted seeds, arm health sampling. Returns the new step number.

        Args:
            graftable: per layer name, the seeds whose finished loads may be grafted at this
                boundary (``None``: every finished load). Lockstep training uses it so that all
                ranks graft at the same step.
        """
        if graftable is not None and not isinstance(graftable, Mapping):
            raise ArgumentTypeError(f"graftable must map layer names to seeds: {shown(graftable)}")
        for name, seeds in (graftable or {}).items():  # all checked before any layer advances
            layer = self.layer(name)
            if not isinstance(seeds, Collection):
                raise ArgumentTypeError(f"graftable[{name!r}] must list seeds: {shown(seeds)}")
            for seed_idx in seeds:
                layer._seed(seed_idx)
        self._step += 1
        self.morph_step.fill_(self._step)
        for layer in self._unique_layers():
            allowed = None if graftable is None else graftable.get(layer.layer_name, ())
            layer.advance(self._step, graftable=allowed)
        self.widenings.advance()
        self._advance_blocks()
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
        if not callable(listener):
            raise ArgumentTypeError(f"listener must be callable, got {shown(listener)}")
        self._graft_listeners.append(listener)

    def on_kernel_removed(self, listener: KernelListener) -> None:
        """Call ``listener(layer_name, seed_idx, module)`` whenever a kernel is removed."""
        if not callable(listener):
            raise ArgumentTypeError(f"listener must be callable, got {shown(listener)}")
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
        with its optimizer state when the kernel is removed. Its ``load_state_dict`` then matches
        groups by tag (see :meth:`load_optimizer_state_dict`)."""
        if any(attached is optimizer for attached in self._optimizers):
            raise ConfigurationError("this optimizer is already attached to the model")
        on_graft, on_removal = optimizer_state.kernel_group_listeners(optimizer, group_options)
        self._optimizers.append(optimizer)
        self.on_kernel_grafted(on_graft)
        self.on_kernel_removed(on_removal)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()``, whose kernel groups carry their ``esper_seed`` tags: save
        it next to ``model.state_dict()`` and restore it with :meth:`load_optimizer_state_dict`."""
        return optimizer_state.check_optimizer(optimizer).state_dict()

    def load_optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]
    ) -> None:
        """Restore an optimizer state saved by :meth:`optimizer_state_dict`, after
        ``load_state_dict`` re-grafted the kernels (in model order, not graft order): groups are
        matched by seed tag, and every saved state tensor must fit its parameter.

        Raises:
            ConfigurationError: the groups or shapes do not match; the optimizer is unchanged.
        """
        optimizer_state.load_optimizer_state_dict(optimizer, state_dict)

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
        if reduce is not None and not callable(reduce):
            raise ArgumentTypeError(f"reduce must be callable or None, got {shown(reduce)}")
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
        """A plain copy of the model, made of torch classes only, that computes what this one
        computes now (see :mod:`esper.core.unwrap`): kept kernels are merged into their host's
        weights where that is exact, else carried by a ``torch.fx`` module on the host."""
        return unwrap_model(self.model)

    def _check_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        """Load pre-hook: check every seeded layer's slice before any module loads a tensor."""
        for name, module in self.named_modules(prefix=prefix.removesuffix(".")):
            if isinstance(module, KasminaLayer):
                check_layer_slice(
                    state_dict,
                    f"{name}." if name else "",
                    layer_name=module.layer_name,
                    num_seeds=module.num_seeds,
                    target=module.target(),
                )

    def _after_state_dict_load(self, incompatible_keys: Any) -> None:
        self._step = int(self.morph_step.item())


def _is_seed_name(name: str) -> bool:
    return ".seeds." in f".{name}"


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
    settings = check_seed_settings(
        num_seeds=seeds_per_layer,
        blend_steps=blend_steps,
        max_retries=max_retries,
        retry_backoff_steps=retry_backoff_steps,
        health_every=health_every,
    )
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
    targets = select_targets(model, target_layers)
    if not inplace:
        model = copy.deepcopy(model)
        targets = select_targets(model, [n for names in targets.values() for n in names])
    modules = dict(model.named_modules(remove_duplicate=False))
    inside_fused = modules_inside_fused(model)
    replacements: dict[int, nn.Module] = {}
    layers: dict[str, KasminaLayer] = {}
    for key, names in targets.items():
        layer = KasminaLayer(
            modules[names[0]],
            layer_name=names[0],
            inside_fused_module=key in inside_fused,
            **settings,
        )
        replacements[key] = layer
        layers.update(dict.fromkeys(names, layer))
    replace_modules(model, replacements)
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
