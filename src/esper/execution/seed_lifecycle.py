"""Seed lifecycle: a layer's seeds, and the operations that move them through their states.

``DORMANT -> LOADING`` (:meth:`~SeedLifecycle.request_kernel`) ``-> BLENDING``
(:meth:`~SeedLifecycle.graft`, alpha 0) ``-> ACTIVE`` (the alpha ramp of
:meth:`~SeedLifecycle.advance`) ``-> FOSSILIZED`` (:meth:`~SeedLifecycle.fossilize`); a kernel
fault sends a seed to ERROR_RECOVERY, retried with a doubling backoff at step boundaries;
:meth:`~SeedLifecycle.unload` culls it back to DORMANT. Every transition is checked against
:data:`esper.contracts.TRANSITIONS` before anything changes.

:class:`SeedLifecycle` is the base class of :class:`~esper.execution.KasminaLayer`, which adds the
forward. It owns what the lifecycle changes: the seed layout (device buffers and host mirror,
:attr:`~SeedLifecycle.seed_layout`), the grafted kernel modules (``seeds``), the loads in flight
(futures of the kernel cache; checked, never waited on) and the checkpoint restore of all of it.
After each change that alters which seeds run, or arms health sampling, it calls
:meth:`~SeedLifecycle._select_forward` so the layer can rebind its forward.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from concurrent.futures import Future
from typing import Any, Protocol, cast

import torch
from torch import nn

from esper.contracts import KernelTarget, SeedState, check_transition
from esper.errors import ArgumentTypeError, ConfigurationError, KernelShapeMismatchError
from esper.execution.arguments import (
    check_alpha,
    check_int,
    check_seed_index,
    is_integer,
    shown,
)
from esper.execution.artifact_sources import check_kernel_id
from esper.execution.grafted_kernel import GraftedKernel
from esper.execution.kernel_cache import CachedKernel, KernelCache
from esper.execution.layer_kinds import LayerProfile
from esper.execution.seed_checkpoint import build_restored_kernels, check_layer_slice
from esper.execution.state_layout import SEED_LAYOUT_KEY, SeedStateLayout

logger = logging.getLogger(__name__)

_MAX_RETRY_STEP = 2**62
"""Retry steps are clamped here: the backoff doubles per fault, the device keeps an int64."""


class SeedEvents(Protocol):
    """Receives a layer's structural changes (the morphable model forwards them to listeners)."""

    def kernel_grafted(self, layer_name: str, seed_idx: int, module: nn.Module) -> None:
        """A kernel's parameters joined the model (e.g. add them to the optimizer)."""
        ...

    def kernel_removed(self, layer_name: str, seed_idx: int, module: nn.Module) -> None:
        """A kernel's parameters left the model (e.g. drop them from the optimizer)."""
        ...


class SeedLifecycle(nn.Module):
    """A host module's ``num_seeds`` seeds and their lifecycle operations (arguments checked by
    :class:`~esper.execution.KasminaLayer`, which documents them)."""

    def __init__(
        self,
        base: nn.Module,
        *,
        profile: LayerProfile,
        num_seeds: int,
        layer_name: str,
        blend_steps: int,
        max_retries: int,
        retry_backoff_steps: int,
        health_every: int,
    ) -> None:
        super().__init__()
        floating = [t.dtype for t in (*base.parameters(), *base.buffers()) if t.is_floating_point()]
        dtype = floating[0] if floating else torch.get_default_dtype()
        self.base = base
        self.add_module(SEED_LAYOUT_KEY, SeedStateLayout(num_seeds, dtype=dtype))
        # ``self.seeds`` (an nn.ModuleDict of GraftedKernels by seed index) exists only while a
        # kernel is grafted: fused inference paths scan every submodule on every call.
        self.profile = profile
        self.layer_name = layer_name
        self.blend_steps = blend_steps
        self.max_retries = max_retries
        self.retry_backoff_steps = retry_backoff_steps
        self.health_every = health_every
        self.last_errors: dict[int, BaseException] = {}
        """The most recent load or kernel failure of each seed (for inspection; also logged)."""
        self._kernels: list[GraftedKernel | None] = [None] * num_seeds
        self._pending: dict[int, Future[CachedKernel]] = {}
        self._cache: KernelCache | None = None
        self._events: SeedEvents | None = None
        self._step = 0
        self._record_health = False
        """Armed by :meth:`advance` every ``health_every`` steps; the next forward records."""
        self.register_load_state_dict_post_hook(SeedLifecycle._after_state_dict_load)

    def _select_forward(self) -> None:
        """Rebind the forward to the running seeds and health sampling (the layer's part)."""
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave loads in flight behind (a future belongs to one process)."""
        state = super().__getstate__()
        state["_pending"] = {}
        return state

    # -- state ---------------------------------------------------------------------------------

    @property
    def seed_layout(self) -> SeedStateLayout:
        """The seeds' buffers (structure of arrays) and host mirror; state-dict key
        ``seed_state`` (:data:`~esper.execution.state_layout.SEED_LAYOUT_KEY`)."""
        return cast(SeedStateLayout, self._modules[SEED_LAYOUT_KEY])

    @property
    def num_seeds(self) -> int:
        """Number of seeds of this layer."""
        return self.seed_layout.num_seeds

    @property
    def seed_states(self) -> tuple[SeedState, ...]:
        """Current state of every seed (host mirror; no device read)."""
        return tuple(slot.state for slot in self.seed_layout.slots)

    @property
    def seeds(self) -> nn.ModuleDict:
        """Grafted kernels by seed index (as strings); empty when no kernel is grafted."""
        seeds = self._modules.get("seeds")
        return seeds if isinstance(seeds, nn.ModuleDict) else nn.ModuleDict()

    def kernel(self, seed_idx: int) -> nn.Module | None:
        """The kernel module grafted in a seed, if any."""
        seed_idx = self._seed(seed_idx)
        grafted = self._kernels[seed_idx]
        return grafted.kernel if grafted is not None else None

    def target(self) -> KernelTarget:
        """The kernel geometry this layer's seeds accept, in the base layer's dtype and device."""
        reference = next(iter((*self.base.parameters(), *self.base.buffers())), None)
        dtype = reference.dtype if reference is not None else torch.get_default_dtype()
        device = reference.device if reference is not None else torch.device("cpu")
        return self.profile.target(dtype=str(dtype).removeprefix("torch."), device=str(device))

    def attach(self, cache: KernelCache, events: SeedEvents | None = None) -> None:
        """Use ``cache`` to load kernels and report structural changes to ``events``."""
        if not isinstance(cache, KernelCache):
            raise ArgumentTypeError(f"cache must be a KernelCache, got {type(cache).__name__}")
        self._cache = cache
        object.__setattr__(self, "_events", events)  # a back-reference, not a child module

    # -- loading and grafting ------------------------------------------------------------------

    def request_kernel(self, seed_idx: int, kernel_id: str) -> Future[CachedKernel]:
        """Start loading ``kernel_id`` into a DORMANT seed (-> LOADING); never blocks.

        The kernel is grafted at the next :meth:`advance` after the load finishes (or by
        :meth:`complete_load`).
        """
        seed_idx = self._seed(seed_idx)
        if self._cache is None:
            raise ConfigurationError(
                f"layer {self.layer_name!r} has no kernel cache; wrap the model with esper.wrap() "
                "or call attach(cache) first"
            )
        check_kernel_id(kernel_id)  # before anything changes: a bad id must leave the seed as is
        self.seed_layout.transition(seed_idx, SeedState.LOADING, where=self._where(seed_idx))
        self.seed_layout.set_kernel_id(seed_idx, kernel_id)
        self.seed_layout.set_errors(seed_idx, error_count=0, retry_after_step=0)  # a new kernel
        future = self._cache.get(kernel_id)
        self._pending[seed_idx] = future
        return future

    def pending_loads(self) -> dict[int, bool]:
        """Seeds with a load in flight, and whether each load has finished (host flag)."""
        return {seed_idx: future.done() for seed_idx, future in sorted(self._pending.items())}

    def complete_load(self, seed_idx: int) -> bool:
        """Graft a LOADING seed's kernel if its load finished; return whether the seed left LOADING.

        A failed load returns the seed to DORMANT and re-raises nothing: the error is logged and
        kept in :attr:`last_errors` (use the future from :meth:`request_kernel` to get it raised).
        """
        seed_idx = self._seed(seed_idx)
        future = self._pending.get(seed_idx)
        if future is None or not future.done():
            return False
        del self._pending[seed_idx]
        exc = future.exception()
        if exc is None:
            try:
                self.graft(seed_idx, future.result())
                return True
            except (KernelShapeMismatchError, ConfigurationError) as graft_exc:
                exc = graft_exc
        self._fail_load(seed_idx, exc)
        return True

    def graft(self, seed_idx: int, cached: CachedKernel) -> nn.Module:
        """Graft a loaded kernel into a LOADING seed (-> BLENDING at alpha 0); return its module.

        Raises:
            KernelShapeMismatchError: the kernel was built for another layer geometry.
        """
        seed_idx = self._seed(seed_idx)
        if not isinstance(cached, CachedKernel):
            raise ArgumentTypeError(
                f"graft() takes the CachedKernel a KernelCache loaded, got {type(cached).__name__}"
            )
        check_transition(
            self.seed_layout.slots[seed_idx].state, SeedState.BLENDING, where=self._where(seed_idx)
        )
        expected = self.target()
        built_for = cached.metadata.target
        if not expected.same_geometry(built_for):
            raise KernelShapeMismatchError(
                f"{self._where(seed_idx)}: kernel {cached.metadata.kernel_id[:12]} was built for "
                f"{built_for.describe()} but this layer needs {expected.describe()}; compile the "
                "blueprint for this layer's shape"
            )
        reference = next(iter((*self.base.parameters(), *self.base.buffers())), None)
        device = reference.device if reference is not None else torch.device("cpu")
        dtype = reference.dtype if reference is not None else torch.get_default_dtype()
        grafted = GraftedKernel(
            cached.instantiate(device=device, dtype=dtype),
            cached.metadata.blueprint,
            built_for,
        )
        self.seed_layout.transition(seed_idx, SeedState.BLENDING, where=self._where(seed_idx))
        self.seed_layout.set_kernel_id(seed_idx, cached.metadata.kernel_id)
        self.seed_layout.set_alpha(seed_idx, 0.0)
        self.seed_layout.set_blend_steps(seed_idx, 0)
        self._install(seed_idx, grafted)
        self._select_forward()
        return grafted.kernel

    # -- culling, keeping, blending ------------------------------------------------------------

    def unload(self, seed_idx: int) -> None:
        """Cull a seed's kernel (LOADING/BLENDING/ACTIVE/ERROR_RECOVERY -> DORMANT)."""
        seed_idx = self._seed(seed_idx)
        self.seed_layout.transition(seed_idx, SeedState.DORMANT, where=self._where(seed_idx))
        self._pending.pop(seed_idx, None)
        self._reset_seed(seed_idx)

    def fossilize(self, seed_idx: int) -> None:
        """Keep an ACTIVE seed's kernel permanently (ACTIVE -> FOSSILIZED)."""
        seed_idx = self._seed(seed_idx)
        self.seed_layout.transition(seed_idx, SeedState.FOSSILIZED, where=self._where(seed_idx))
        self._select_forward()  # a fossilized kernel runs as a plain module, unguarded

    def set_alpha(self, seed_idx: int, value: float) -> None:
        """Override the blend weight of a seed that holds a kernel (0 <= value <= 1)."""
        seed_idx = self._seed(seed_idx)
        value = check_alpha(value)
        if not self.seed_layout.slots[seed_idx].state.runs_kernel:
            raise ConfigurationError(
                f"{self._where(seed_idx)} is {self.seed_layout.slots[seed_idx].state.name}: only "
                "a seed in BLENDING, ACTIVE or FOSSILIZED has an alpha to set"
            )
        self.seed_layout.set_alpha(seed_idx, value)

    def activate(self, seed_idx: int) -> None:
        """End a BLENDING seed's ramp now (-> ACTIVE at alpha 1): the next forward runs the
        kernel fully (inference-time grafting)."""
        seed_idx = self._seed(seed_idx)
        check_transition(
            self.seed_layout.slots[seed_idx].state, SeedState.ACTIVE, where=self._where(seed_idx)
        )
        if self.seed_layout.slots[seed_idx].state is not SeedState.BLENDING:
            raise ConfigurationError(
                f"{self._where(seed_idx)} is {self.seed_layout.slots[seed_idx].state.name}: "
                "only a BLENDING seed can be activated"
            )
        self._ramp(seed_idx, self.blend_steps)

    # -- step boundaries -----------------------------------------------------------------------

    def advance(self, step: int, *, graftable: Collection[int] | None = None) -> None:
        """Step boundary: graft finished loads, ramp alphas, retry faulted seeds, arm telemetry.

        Args:
            step: the new step number.
            graftable: seeds whose finished loads may be grafted now (``None``: all). Lockstep
                training passes the seeds whose loads finished on every rank.
        """
        step = check_int("step", step, minimum=0, maximum=2**62)
        if graftable is not None and not (
            isinstance(graftable, Collection) and all(is_integer(i) for i in graftable)
        ):
            raise ArgumentTypeError(
                f"graftable must be a collection of seed indices or None, got {shown(graftable)}"
            )
        self._step = step
        # A kernel grafted at this boundary runs its first step at alpha 0; its ramp starts next.
        just_grafted = {
            i
            for i in list(self._pending)
            if (graftable is None or i in graftable) and self.complete_load(i)
        }
        for seed_idx, slot in enumerate(self.seed_layout.slots):
            if slot.state is SeedState.BLENDING and seed_idx not in just_grafted:
                self._ramp(seed_idx, slot.blend_steps_done + 1)
            elif not slot.state.runs_kernel:
                self._drop_kernel(seed_idx)  # a faulted kernel leaves at the step boundary
            if (
                slot.state is SeedState.ERROR_RECOVERY
                and step >= slot.retry_after_step
                and slot.kernel_id is not None
            ):
                self._retry(seed_idx, slot.kernel_id)
        if self.health_every and step % self.health_every == 0 and not self._record_health:
            self._record_health = True
            self._select_forward()

    def _ramp(self, seed_idx: int, steps_done: int) -> None:
        self.seed_layout.set_blend_steps(seed_idx, steps_done)
        self.seed_layout.set_alpha(seed_idx, min(1.0, steps_done / self.blend_steps))
        if steps_done >= self.blend_steps:
            self.seed_layout.transition(seed_idx, SeedState.ACTIVE, where=self._where(seed_idx))

    def _retry(self, seed_idx: int, kernel_id: str) -> None:
        logger.info("%s: retrying kernel %s", self._where(seed_idx), kernel_id[:12])
        self.seed_layout.transition(seed_idx, SeedState.LOADING, where=self._where(seed_idx))
        assert self._cache is not None
        self._pending[seed_idx] = self._cache.get(kernel_id)

    # -- faults --------------------------------------------------------------------------------

    def _on_kernel_fault(self, seed_idx: int, exc: BaseException) -> None:
        """A kernel raised or produced non-finite output: bypass it and schedule a retry."""
        layout = self.seed_layout
        errors = layout.slots[seed_idx].error_count + 1
        self.last_errors[seed_idx] = exc
        if errors > self.max_retries:
            logger.warning(
                "%s: kernel failed %d times (last: %s); giving up, seed back to DORMANT",
                self._where(seed_idx),
                errors,
                exc,
            )
            layout.transition(seed_idx, SeedState.ERROR_RECOVERY, where=self._where(seed_idx))
            layout.transition(seed_idx, SeedState.DORMANT, where=self._where(seed_idx))
            layout.set_errors(seed_idx, error_count=errors, retry_after_step=0)
            layout.set_kernel_id(seed_idx, None)
            layout.set_alpha(seed_idx, 0.0)
        else:
            retry_after = min(
                self._step + self.retry_backoff_steps * 2 ** (errors - 1), _MAX_RETRY_STEP
            )
            logger.warning(
                "%s: kernel fault (%s); bypassed, retry %d/%d at step %d",
                self._where(seed_idx),
                exc,
                errors,
                self.max_retries,
                retry_after,
            )
            layout.transition(seed_idx, SeedState.ERROR_RECOVERY, where=self._where(seed_idx))
            layout.set_errors(seed_idx, error_count=errors, retry_after_step=retry_after)
        self._select_forward()

    def _fail_load(self, seed_idx: int, exc: BaseException) -> None:
        self.last_errors[seed_idx] = exc
        logger.warning(
            "%s: kernel load failed, seed back to DORMANT: %s", self._where(seed_idx), exc
        )
        self.seed_layout.transition(seed_idx, SeedState.DORMANT, where=self._where(seed_idx))
        self._reset_seed(seed_idx)

    def _reset_seed(self, seed_idx: int) -> None:
        self._drop_kernel(seed_idx)
        self.seed_layout.set_kernel_id(seed_idx, None)
        self.seed_layout.set_alpha(seed_idx, 0.0)
        self.seed_layout.set_blend_steps(seed_idx, 0)
        self._select_forward()

    # -- kernel modules ------------------------------------------------------------------------

    def _install(self, seed_idx: int, grafted: GraftedKernel) -> None:
        self._drop_kernel(seed_idx)
        if "seeds" not in self._modules:
            self._modules["seeds"] = nn.ModuleDict()  # add_module refuses: ``seeds`` is a property
        self.seeds[str(seed_idx)] = grafted
        self._kernels[seed_idx] = grafted
        if self._events is not None:
            self._events.kernel_grafted(self.layer_name, seed_idx, grafted.kernel)

    def _drop_kernel(self, seed_idx: int) -> None:
        grafted = self._kernels[seed_idx]
        if grafted is None:
            return
        seeds = self._modules["seeds"]
        assert isinstance(seeds, nn.ModuleDict)
        del seeds[str(seed_idx)]
        if not len(seeds):
            del self._modules["seeds"]
        self._kernels[seed_idx] = None
        if self._events is not None:
            self._events.kernel_removed(self.layer_name, seed_idx, grafted.kernel)

    def _seed(self, seed_idx: object) -> int:
        """``seed_idx`` as an ``int`` if it indexes a seed; else :class:`SeedIndexError`."""
        return check_seed_index(seed_idx, num_seeds=self.num_seeds, layer_name=self.layer_name)

    def _where(self, seed_idx: int) -> str:
        return f"layer {self.layer_name!r} seed {seed_idx}"

    # -- checkpoints ---------------------------------------------------------------------------

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Before the children load: check this layer's slice of the checkpoint (before anything
        is allocated or changed; :class:`~esper.errors.StateDictError` if it does not fit), then
        rebuild the seed modules it holds."""
        target = self.target()
        restored = check_layer_slice(
            state_dict, prefix, layer_name=self.layer_name, num_seeds=self.num_seeds, target=target
        )
        kernels = build_restored_kernels(restored, target, device=target.device)
        for seed_idx in range(self.num_seeds):
            if seed_idx in kernels:
                self._install(seed_idx, kernels[seed_idx])
            else:
                self._drop_kernel(seed_idx)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _after_state_dict_load(self, incompatible_keys: Any) -> None:
        """After everything loaded: rebuild the host mirror; interrupted loads become DORMANT."""
        self._pending.clear()
        layout = self.seed_layout
        layout.reload_from_buffers()
        for seed_idx, slot in enumerate(layout.slots):
            if slot.state is SeedState.LOADING:
                layout.transition(seed_idx, SeedState.DORMANT, where=self._where(seed_idx))
                self._reset_seed(seed_idx)
        self._select_forward()
