"""KasminaLayer: a host layer with N seeds that can each carry a grafted, blended kernel.

``y = base(x) + Σ_{running seeds i} alpha_i · kernel_i(u)`` where ``u`` is the layer's input or
output depending on its kind (see :mod:`esper.execution.layer_kinds`).

Performance contract (design invariants 1–6):

* With no kernel running, the layer's ``forward`` *is* the base module's ``forward`` (bound at
  lifecycle changes), so a dormant layer costs exactly one module call, as the unwrapped model.
* Which seeds run is host state (``seed_state.running``), changed only by lifecycle calls;
  alphas are device buffers; the forward never reads a device value on the host.
* A kernel whose output is not finite contributes zero (on the device, its sum accumulated in at
  least float32) and is counted on the device; it is quarantined when telemetry is next read.
* A kernel that raises, or whose output the blend cannot use, is bypassed for the rest of that
  forward and put in ERROR_RECOVERY; nothing done around a kernel can crash the host's forward.
* Loading happens on the kernel cache's threads; this layer only checks a finished future at
  step boundaries (:meth:`KasminaLayer.advance`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from concurrent.futures import Future
from typing import Any, Protocol

import torch
from torch import nn

from esper.contracts import HealthSignal, KernelTarget, LayerStats, SeedState, check_transition
from esper.errors import ArgumentTypeError, ConfigurationError, KernelShapeMismatchError
from esper.execution import seed_health
from esper.execution.arguments import (
    check_alpha,
    check_int,
    check_name,
    check_seed_index,
    check_seed_settings,
    is_integer,
    shown,
)
from esper.execution.artifact_sources import check_kernel_id
from esper.execution.fast_paths import (
    disable_fused_fast_paths,
    has_hooks,
    nest_like,
    unbind_sequences,
)
from esper.execution.grafted_kernel import GraftedKernel
from esper.execution.kernel_cache import CachedKernel, KernelCache
from esper.execution.layer_kinds import SUPPORTED_LAYER_TYPES, GraftPoint, profile_layer
from esper.execution.seed_checkpoint import build_restored_kernels, check_layer_slice
from esper.execution.state_layout import SeedStateLayout

logger = logging.getLogger(__name__)


class SeedEvents(Protocol):
    """Receives a layer's structural changes (the morphable model forwards them to listeners)."""

    def kernel_grafted(self, layer_name: str, seed_idx: int, module: nn.Module) -> None:
        """A kernel's parameters joined the model (e.g. add them to the optimizer)."""
        ...

    def kernel_removed(self, layer_name: str, seed_idx: int, module: nn.Module) -> None:
        """A kernel's parameters left the model (e.g. drop them from the optimizer)."""
        ...


_SUM_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32}
"""Kernel outputs in these dtypes are summed (for the finiteness check) in float32: a float16
sum of ordinary activations overflows."""

_MAX_RETRY_STEP = 2**62
"""Retry steps are clamped here: the backoff doubles per fault, the device keeps an int64."""


class _FiniteGradient(torch.autograd.Function):
    """Identity in forward; in backward, non-finite gradient entries become zero.

    Applied to a kernel's input: a kernel whose output is not finite is scaled to zero, but its
    backward (NaN weights times a zero gradient) is NaN, which would reach the host's gradients and
    ruin the host at the next optimizer step. Finite gradients pass unchanged (bit for bit).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


class KasminaLayer(nn.Module):
    """Wraps one host module (kept as is, never copied) and gives it ``num_seeds`` seeds.

    Args:
        base: the host module; one of :data:`SUPPORTED_LAYER_TYPES`.
        num_seeds: number of seeds.
        layer_name: the layer's dotted name in the host model (for messages and telemetry).
        blend_steps: steps over which a grafted kernel's alpha ramps from 0 to 1.
        max_retries: faults tolerated before a seed gives up and returns to DORMANT.
        retry_backoff_steps: steps before the first retry; doubles after each fault.
        health_every: record health statistics on one forward every this many steps (0: never).
        inside_fused_module: the layer lives inside a module with a fused inference path that
            reads its children's weights directly (``nn.TransformerEncoderLayer``): while kernels
            run, the layer then disables that path (see :mod:`esper.execution.fast_paths`).
            ``esper.wrap`` sets it.

    Raises:
        ConfigurationError: ``base`` cannot carry seeds or a setting is out of range
            (:class:`~esper.errors.ArgumentTypeError` for a wrong type).
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        num_seeds: int = 4,
        layer_name: str = "",
        blend_steps: int = 20,
        max_retries: int = 3,
        retry_backoff_steps: int = 10,
        health_every: int = 10,
        inside_fused_module: bool = False,
    ) -> None:
        super().__init__()
        check_name("layer_name", layer_name)
        profile = profile_layer(base) if isinstance(base, nn.Module) else None
        if profile is None:
            supported = ", ".join(t.__name__ for t in SUPPORTED_LAYER_TYPES)
            raise ConfigurationError(
                f"layer {layer_name or type(base).__name__!r} is a {type(base).__name__}, which "
                f"cannot carry seeds; supported layer types: {supported}"
            )
        settings = check_seed_settings(
            num_seeds=num_seeds,
            blend_steps=blend_steps,
            max_retries=max_retries,
            retry_backoff_steps=retry_backoff_steps,
            health_every=health_every,
            where="num_seeds",
        )
        num_seeds = settings["num_seeds"]
        floating = [t.dtype for t in (*base.parameters(), *base.buffers()) if t.is_floating_point()]
        self.base = base
        self.seed_state = SeedStateLayout(
            num_seeds, dtype=floating[0] if floating else torch.get_default_dtype()
        )
        # ``self.seeds`` (an nn.ModuleDict of GraftedKernels by seed index) exists only while a
        # kernel is grafted: fused inference paths scan every submodule on every call.
        self.profile = profile
        self._reads_input = profile.graft_point is GraftPoint.INPUT
        self._returns_tuple = profile.returns_tuple
        self.layer_name = layer_name
        self.blend_steps: int = settings["blend_steps"]
        self.max_retries: int = settings["max_retries"]
        self.retry_backoff_steps: int = settings["retry_backoff_steps"]
        self.health_every: int = settings["health_every"]
        self.inside_fused_module = bool(inside_fused_module)
        self.last_errors: dict[int, BaseException] = {}
        """The most recent load or kernel failure of each seed (for inspection; also logged)."""
        self._kernels: list[GraftedKernel | None] = [None] * num_seeds
        self._pending: dict[int, Future[CachedKernel]] = {}
        self._cache: KernelCache | None = None
        self._events: SeedEvents | None = None
        self._step = 0
        self._record_health = False
        self._running_seeds: tuple[
            tuple[int, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], ...
        ] = ()
        self._select_forward()
        self.register_load_state_dict_post_hook(KasminaLayer._after_state_dict_load)

    # -- forward -------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Base output plus blended kernels (normally replaced by the bound fast path)."""
        return self._forward_morphed(*args, **kwargs)

    def _select_forward(self) -> None:
        """Bind ``self.forward`` to the cheapest path that is correct for the current state.

        Also rebuilds ``_running_seeds``: per running seed, its kernel and views of its alpha and
        health buffers, so the forward does no indexing or attribute lookups per seed.
        """
        state = self.seed_state
        self._running_seeds = tuple(
            (
                i,
                self._kernel_module(i),
                state.alpha[i],
                state.seed_health[i],
                state.seed_health[i, 2],
            )
            for i in state.running
        )
        forward: Callable[..., Any]
        if self._running_seeds or self._record_health:
            forward = self._forward_morphed
        elif has_hooks(self.base):
            forward = self.base  # call it as a module so the base's own hooks still run
        else:
            forward = self.base.forward
        # object.__setattr__: a module assigned through nn.Module.__setattr__ would be registered
        # as a child named "forward".
        object.__setattr__(self, "forward", forward)
        guards = [k for k, h in self._forward_pre_hooks.items() if h is disable_fused_fast_paths]
        if self._running_seeds and self.inside_fused_module and not guards:
            self.register_forward_pre_hook(disable_fused_fast_paths)
        elif not self._running_seeds:
            for key in guards:
                del self._forward_pre_hooks[key]

    def _forward_morphed(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base(*args, **kwargs)
        base_out = out[0] if self._returns_tuple else out
        if self._reads_input:
            kernel_in = args[0] if args else next(iter(kwargs.values()))
        else:
            kernel_in = base_out
        if base_out.is_nested:  # host metadata: TransformerEncoder's nested inference path
            y = self._blend_sequences(base_out, kernel_in)
        else:
            y = self._blend(base_out, kernel_in)
        if self._record_health:
            self._record_health = False
            try:
                seed_health.record_output_health(
                    self.seed_state.layer_health, base_out, self.profile.channel_dim
                )
            except Exception as exc:  # statistics must never take the host's forward down
                logger.warning("layer %r: health sample skipped: %s", self.layer_name, exc)
            self._select_forward()
        if self._returns_tuple:
            return (y, *out[1:])
        return y

    def _blend(self, y: torch.Tensor, kernel_in: torch.Tensor) -> torch.Tensor:
        """``y + Σ alpha_i · kernel_i(kernel_in)`` over the running seeds (dense tensors)."""
        record = self._record_health
        for seed_idx, kernel, alpha, health, output_sum in self._running_seeds:
            try:  # everything done with a kernel's output is guarded: a fault bypasses the seed
                k = kernel(
                    _FiniteGradient.apply(kernel_in) if kernel_in.requires_grad else kernel_in
                )
                wide = _SUM_DTYPES.get(k.dtype)  # sum(dtype=None) costs a microsecond more
                k_sum = k.detach().sum() if wide is None else k.detach().sum(dtype=wide)
                output_sum.add_(k_sum)  # stays finite iff every output in the window was
                # Non-finite output contributes exactly zero without a host read: nan_to_num makes
                # every element finite, and the scale drops to zero because k_sum - k_sum is 0
                # for a finite sum and NaN for an infinite or NaN one (cheaper than isfinite).
                scale = torch.nan_to_num(alpha + (k_sum - k_sum), nan=0.0)
                k = torch.nan_to_num(k, nan=0.0, posinf=0.0, neginf=0.0)
                if record:
                    contribution_sq = (k.detach().to(health.dtype) * scale).square().mean()
                    health[:2].add_(
                        torch.stack([contribution_sq, torch.ones_like(contribution_sq)])
                    )
                if scale.dtype != y.dtype:  # a float32 scale would promote under CUDA autocast
                    scale = scale.to(y.dtype)
                y = torch.addcmul(y, k, scale)
            except Exception as exc:  # a faulty kernel must never take training down
                self._on_kernel_fault(seed_idx, exc)
        return y

    def _blend_sequences(self, base_out: torch.Tensor, kernel_in: torch.Tensor) -> torch.Tensor:
        """:meth:`_blend` for a nested tensor, one sequence at a time (see ``fast_paths``)."""
        if not self._running_seeds:
            return base_out
        try:
            outputs = unbind_sequences(base_out)
            inputs = outputs if kernel_in is base_out else unbind_sequences(kernel_in)
            pieces = [self._blend(y, u) for y, u in zip(outputs, inputs, strict=True)]
            return nest_like(pieces, base_out)
        except Exception as exc:
            for seed_idx, *_ in self._running_seeds:
                self._on_kernel_fault(seed_idx, exc)
            return base_out

    def __getattr__(self, name: str) -> Any:
        """Fall back to the base module's attributes (``layer.weight``, ``attn.batch_first``...).

        Fused paths such as ``nn.TransformerEncoderLayer``'s read a dozen attributes of their
        children per call, so this goes straight to the dictionaries that hold them (this layer
        registers no parameters or buffers of its own, only modules) instead of raising and
        catching an AttributeError on the way.
        """
        modules = self.__dict__.get("_modules")
        if modules is not None and name in modules:
            return modules[name]
        base = modules.get("base") if modules is not None else None
        if base is None or name == "base":
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        base_own = base.__dict__
        if name in base_own:
            return base_own[name]
        if name in base_own["_parameters"]:
            return base_own["_parameters"][name]
        if name in base_own["_buffers"]:
            return base_own["_buffers"][name]
        return getattr(base, name)  # submodules, properties, methods

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave loads in flight behind (a future belongs to one process) and
        rebuild the bound forward and buffer views for the copy (see ``__setstate__``)."""
        state = super().__getstate__()
        state["_pending"] = {}
        state.pop("forward", None)
        state["_running_seeds"] = ()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._select_forward()

    def _apply(self, fn: Any, recurse: bool = True) -> KasminaLayer:
        """``.to()``/``.float()``/...: buffers are replaced, so rebind the per-seed views."""
        super()._apply(fn, recurse)
        self._select_forward()
        return self

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def num_seeds(self) -> int:
        """Number of seeds of this layer."""
        return self.seed_state.num_seeds

    @property
    def seed_states(self) -> tuple[SeedState, ...]:
        """Current state of every seed (host mirror; no device read)."""
        return tuple(slot.state for slot in self.seed_state.slots)

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
        self.seed_state.transition(seed_idx, SeedState.LOADING, where=self._where(seed_idx))
        self.seed_state.set_kernel_id(seed_idx, kernel_id)
        self.seed_state.set_errors(seed_idx, error_count=0, retry_after_step=0)  # a new kernel
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
            self.seed_state.slots[seed_idx].state, SeedState.BLENDING, where=self._where(seed_idx)
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
        self.seed_state.transition(seed_idx, SeedState.BLENDING, where=self._where(seed_idx))
        self.seed_state.set_kernel_id(seed_idx, cached.metadata.kernel_id)
        self.seed_state.set_alpha(seed_idx, 0.0)
        self.seed_state.set_blend_steps(seed_idx, 0)
        self._install(seed_idx, grafted)
        self._select_forward()
        return grafted.kernel

    def unload(self, seed_idx: int) -> None:
        """Cull a seed's kernel (LOADING/BLENDING/ACTIVE/ERROR_RECOVERY -> DORMANT)."""
        seed_idx = self._seed(seed_idx)
        self.seed_state.transition(seed_idx, SeedState.DORMANT, where=self._where(seed_idx))
        self._pending.pop(seed_idx, None)
        self._reset_seed(seed_idx)

    def fossilize(self, seed_idx: int) -> None:
        """Keep an ACTIVE seed's kernel permanently (ACTIVE -> FOSSILIZED)."""
        seed_idx = self._seed(seed_idx)
        self.seed_state.transition(seed_idx, SeedState.FOSSILIZED, where=self._where(seed_idx))

    def set_alpha(self, seed_idx: int, value: float) -> None:
        """Override the blend weight of a seed that holds a kernel (0 <= value <= 1)."""
        seed_idx = self._seed(seed_idx)
        value = check_alpha(value)
        if not self.seed_state.slots[seed_idx].state.runs_kernel:
            raise ConfigurationError(
                f"{self._where(seed_idx)} is {self.seed_state.slots[seed_idx].state.name}: only a "
                "seed in BLENDING, ACTIVE or FOSSILIZED has an alpha to set"
            )
        self.seed_state.set_alpha(seed_idx, value)

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
        for seed_idx, slot in enumerate(self.seed_state.slots):
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
        self.seed_state.set_blend_steps(seed_idx, steps_done)
        self.seed_state.set_alpha(seed_idx, min(1.0, steps_done / self.blend_steps))
        if steps_done >= self.blend_steps:
            self.seed_state.transition(seed_idx, SeedState.ACTIVE, where=self._where(seed_idx))

    def _retry(self, seed_idx: int, kernel_id: str) -> None:
        logger.info("%s: retrying kernel %s", self._where(seed_idx), kernel_id[:12])
        self.seed_state.transition(seed_idx, SeedState.LOADING, where=self._where(seed_idx))
        assert self._cache is not None
        self._pending[seed_idx] = self._cache.get(kernel_id)

    def _on_kernel_fault(self, seed_idx: int, exc: BaseException) -> None:
        """A kernel raised or produced non-finite output: bypass it and schedule a retry."""
        slot = self.seed_state.slots[seed_idx]
        errors = slot.error_count + 1
        self.last_errors[seed_idx] = exc
        if errors > self.max_retries:
            logger.warning(
                "%s: kernel failed %d times (last: %s); giving up, seed back to DORMANT",
                self._where(seed_idx),
                errors,
                exc,
            )
            self.seed_state.transition(
                seed_idx, SeedState.ERROR_RECOVERY, where=self._where(seed_idx)
            )
            self.seed_state.transition(seed_idx, SeedState.DORMANT, where=self._where(seed_idx))
            self.seed_state.set_errors(seed_idx, error_count=errors, retry_after_step=0)
            self.seed_state.set_kernel_id(seed_idx, None)
            self.seed_state.set_alpha(seed_idx, 0.0)
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
            self.seed_state.transition(
                seed_idx, SeedState.ERROR_RECOVERY, where=self._where(seed_idx)
            )
            self.seed_state.set_errors(seed_idx, error_count=errors, retry_after_step=retry_after)
        self._select_forward()

    def _fail_load(self, seed_idx: int, exc: BaseException) -> None:
        self.last_errors[seed_idx] = exc
        logger.warning(
            "%s: kernel load failed, seed back to DORMANT: %s", self._where(seed_idx), exc
        )
        self.seed_state.transition(seed_idx, SeedState.DORMANT, where=self._where(seed_idx))
        self._reset_seed(seed_idx)

    def _reset_seed(self, seed_idx: int) -> None:
        self._drop_kernel(seed_idx)
        self.seed_state.set_kernel_id(seed_idx, None)
        self.seed_state.set_alpha(seed_idx, 0.0)
        self.seed_state.set_blend_steps(seed_idx, 0)
        self._select_forward()

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

    @property
    def seeds(self) -> nn.ModuleDict:
        """Grafted kernels by seed index (as strings); empty when no kernel is grafted."""
        seeds = self._modules.get("seeds")
        return seeds if isinstance(seeds, nn.ModuleDict) else nn.ModuleDict()

    def _kernel_module(self, seed_idx: int) -> nn.Module:
        grafted = self._kernels[seed_idx]
        assert grafted is not None, "a running seed always holds a kernel"
        return grafted.kernel

    def kernel(self, seed_idx: int) -> nn.Module | None:
        """The kernel module grafted in a seed, if any."""
        seed_idx = self._seed(seed_idx)
        grafted = self._kernels[seed_idx]
        return grafted.kernel if grafted is not None else None

    def _seed(self, seed_idx: object) -> int:
        """``seed_idx`` as an ``int`` if it indexes a seed; else :class:`SeedIndexError`."""
        return check_seed_index(seed_idx, num_seeds=self.num_seeds, layer_name=self.layer_name)

    def _where(self, seed_idx: int) -> str:
        return f"layer {self.layer_name!r} seed {seed_idx}"

    # -- telemetry -----------------------------------------------------------------------------

    def health_tensor(self) -> torch.Tensor:
        """This window's accumulators and the base grad norm as one flat device tensor (see
        :func:`esper.execution.seed_health.health_tensor`)."""
        return seed_health.health_tensor(self.base, self.seed_state)

    @staticmethod
    def health_tensor_size(num_seeds: int) -> int:
        """Length of :meth:`health_tensor` for a layer with ``num_seeds`` seeds."""
        return seed_health.health_tensor_size(num_seeds)

    def health_signal(self, values: list[float], *, step: int, timestamp: float) -> HealthSignal:
        """Turn this layer's slice of the health transfer into a :class:`HealthSignal`.

        Also quarantines every running seed whose kernel produced non-finite output in the window,
        and resets the accumulators.
        """
        for seed_idx in seed_health.nonfinite_seeds(values, self.num_seeds):
            if self.seed_state.slots[seed_idx].state.runs_kernel:
                self._on_kernel_fault(seed_idx, FloatingPointError("kernel output was not finite"))
        signal = seed_health.build_health_signal(
            values,
            self.seed_state.slots,
            layer_name=self.layer_name,
            layer_kind=self.profile.kind,
            step=step,
            timestamp=timestamp,
        )
        self.seed_state.reset_health()
        return signal

    def stats(self) -> LayerStats:
        """Parameter counts and seed states of this layer."""
        counts = dict.fromkeys(SeedState, 0)
        for slot in self.seed_state.slots:
            counts[slot.state] += 1
        return LayerStats(
            layer_name=self.layer_name,
            layer_kind=self.profile.kind,
            base_parameters=sum(p.numel() for p in self.base.parameters()),
            kernel_parameters=sum(
                p.numel() for grafted in self._kernels if grafted for p in grafted.parameters()
            ),
            seeds_by_state=counts,
            kernel_ids=tuple(slot.kernel_id for slot in self.seed_state.slots),
        )

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
        self.seed_state.reload_from_buffers()
        for seed_idx, slot in enumerate(self.seed_state.slots):
            if slot.state is SeedState.LOADING:
                self.seed_state.transition(seed_idx, SeedState.DORMANT, where=self._where(seed_idx))
                self._reset_seed(seed_idx)
        self._select_forward()
