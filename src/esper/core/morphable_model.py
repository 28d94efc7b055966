"""MorphableModel: a model whose targeted layers carry seeds, and its lifecycle calls.

:func:`esper.wrap` builds one (see :mod:`esper.core.model_wrapper`). Calls address layers by their
dotted names in the original model; loading is done by :mod:`esper.core.kernel_loading`, and
everything Esper injects lives under the keys ``seed_state.`` and ``seeds.`` of the wrappers.
"""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Protocol

import torch
from torch import nn

from esper.contracts import HealthSignal, ModelStats, SeedState
from esper.core import kernel_loading, optimizer_state
from esper.core.optimizer_state import KernelListener
from esper.core.sdk_defaults import DefaultLibrarySource
from esper.core.unwrap import unwrap_model
from esper.errors import ArgumentTypeError, ConfigurationError, UnknownLayerError
from esper.execution import CachedKernel, KasminaLayer, KernelCache
from esper.execution.arguments import check_name, check_timeout, shown
from esper.execution.fast_paths import has_hooks
from esper.execution.health_collection import LayerHealthReader
from esper.execution.seed_checkpoint import check_layer_slice
from esper.operators.deepen_methods import DeepenMethods
from esper.operators.widen_api import WidenOperations

logger = logging.getLogger(__name__)

__all__ = ["Closable", "MorphableModel", "TelemetrySink"]


class TelemetrySink(Protocol):
    """Where :meth:`MorphableModel.collect_telemetry` sends each batch of health signals."""

    def publish(self, signals: Sequence[HealthSignal]) -> None:
        """Deliver one flush of signals; must not block the training thread."""
        ...


class Closable(Protocol):
    """Something :meth:`MorphableModel.close` releases."""

    def close(self) -> None:
        """Release it."""
        ...


class MorphableModel(WidenOperations, DeepenMethods):
    """A model whose targeted layers carry seeds; built by :func:`wrap`.

    Calling it runs the wrapped model unchanged (``forward`` is bound to the wrapped model's
    ``forward``). Lifecycle calls address layers by their dotted names in the original model.
    The loading calls take ``kernel_artifact_id=``, the reference design's public name of what
    Esper calls a ``kernel_id`` everywhere else (the sha256 of the kernel's artifact).

    Args:
        model: the model whose layers were already replaced by :class:`KasminaLayer` wrappers.
        layers: the wrappers by dotted name (aliases of a shared module map to one wrapper).
        kernel_cache: the cache all layers load kernels through.
        telemetry_sink: optional receiver of :meth:`collect_telemetry` results.
        owned: what :func:`wrap` opened for this model (a default library, a telemetry bus),
            closed by :meth:`close`.
    """

    morph_step: torch.Tensor
    plain_copy = staticmethod(unwrap_model)  # DEEPEN's copy of a (seeded) block as plain torch

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, KasminaLayer],
        *,
        kernel_cache: KernelCache,
        telemetry_sink: TelemetrySink | None = None,
        owned: Sequence[Closable] = (),
    ) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("morph_step", torch.zeros((), dtype=torch.int64))
        self._layers = dict(layers)
        self.kernel_cache = kernel_cache
        self.telemetry_sink = telemetry_sink
        self._owned = list(owned)
        self._graft_listeners: list[KernelListener] = []
        self._remove_listeners: list[KernelListener] = []
        self._optimizers: list[torch.optim.Optimizer] = []
        self._step = 0
        self._health: LayerHealthReader | None = None
        for layer in self._unique_layers():
            layer.attach(kernel_cache, self)
        self._bind_forward()
        self.register_load_state_dict_pre_hook(MorphableModel._check_state_dict)
        self.register_load_state_dict_post_hook(MorphableModel._after_state_dict_load)

    def close(self) -> None:
        """Release what :func:`wrap` opened for this model: the default library's connection and
        a telemetry bus given by URL (queued telemetry is sent first). The model still computes;
        later loads from the default library open it again."""
        for resource in self._owned:
            try:
                resource.close()
            except Exception:
                logger.exception("closing %r failed", resource)
        if any(resource is self.telemetry_sink for resource in self._owned):
            self.telemetry_sink = None  # a closed bus: stop publishing to it
        self._owned = [r for r in self._owned if isinstance(r, DefaultLibrarySource)]

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
        next :meth:`step` and ramped by the steps after it. Errors surface through the returned
        future. A name other than a kernel id is resolved first (a quick library lookup).
        """
        self.check_not_widening(layer_name)
        kernel_id = kernel_loading.resolve_kernel_name(self.kernel_cache, kernel_artifact_id)
        return self.layer(layer_name).request_kernel(seed_idx, kernel_id)

    async def load_kernel(
        self,
        layer_name: str,
        *,
        seed_idx: int,
        kernel_artifact_id: str,
        activate: bool = True,
    ) -> nn.Module:
        """Load a kernel into a seed and graft it; returns the kernel module.

        Args:
            layer_name: the seeded layer's dotted name.
            seed_idx: a DORMANT seed of that layer.
            kernel_artifact_id: a kernel id, a unique id prefix (6+ hex digits) or an alias
                kept by the library (``kernel-001``); see :mod:`esper.core.kernel_loading`.
            activate: ``True`` (the default, inference-time grafting): the seed is ACTIVE at
                alpha 1 when this returns, so the next output includes the kernel. ``False``
                (training-time grafting): BLENDING at alpha 0, the output unchanged until
                :meth:`step` ramps alpha over the layer's ``blend_steps``.

        The fetch runs on the kernel cache's threads; awaiting never blocks the event loop.

        Raises:
            KernelNotFoundError: no kernel goes by that name (the seed is unchanged).
            AmbiguousKernelNameError: the id prefix matches several kernels.
            KernelLoadError: fetching, verifying or grafting failed; the seed is DORMANT again.
        """
        layer = self.layer(layer_name)
        self.check_not_widening(layer_name)
        return await kernel_loading.load_async(
            layer, seed_idx, kernel_artifact_id, self.kernel_cache, activate=activate
        )

    def load_kernel_sync(
        self,
        layer_name: str,
        *,
        seed_idx: int,
        kernel_artifact_id: str,
        timeout: float | None = 60.0,
        activate: bool = False,
    ) -> nn.Module:
        """Blocking form of :meth:`load_kernel`, for training scripts without an event loop.

        Unlike :meth:`load_kernel` it grafts for training by default (BLENDING at alpha 0,
        ramped by :meth:`step`); ``activate=True`` makes the seed ACTIVE at once.
        """
        timeout = check_timeout(timeout)
        self.check_not_widening(layer_name)
        return kernel_loading.load_blocking(
            self.layer(layer_name),
            seed_idx,
            kernel_artifact_id,
            self.kernel_cache,
            activate=activate,
            timeout=timeout,
        )

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
        layers = tuple(self._unique_layers())
        if not layers:
            return []
        if self._health is None or self._health.layers != layers:
            self._health = LayerHealthReader(layers)
        signals = self._health.read(step=self._step, timestamp=time.time(), reduce=reduce)
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
