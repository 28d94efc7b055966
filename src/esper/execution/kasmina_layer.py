"""KasminaLayer: a host layer with N seeds that can each carry a grafted, blended kernel.

``y = base(x) + Σ_{running seeds i} alpha_i · kernel_i(u)`` where ``u`` is the layer's input or
output depending on its kind (see :mod:`esper.execution.layer_kinds`).

Performance contract (design invariants 1–6):

* With no kernel running, the layer's ``forward`` *is* the base module's ``forward`` (bound at
  lifecycle changes), so a dormant layer costs exactly one module call, as the unwrapped model.
* Which seeds run is host state (``seed_layout.running``), changed only by lifecycle calls;
  alphas are device buffers; the forward never reads a device value on the host.
* A kernel whose output is not finite contributes zero (on the device, its sum accumulated in at
  least float32) and is counted on the device; it is quarantined when telemetry is next read.
* A kernel that raises, or whose output the blend cannot use, is bypassed for the rest of that
  forward and put in ERROR_RECOVERY; nothing done around a kernel can crash the host's forward.
* Loading happens on the kernel cache's threads; this layer only checks a finished future at
  step boundaries (:meth:`KasminaLayer.advance`).

The lifecycle operations (:meth:`~KasminaLayer.request_kernel`, :meth:`~KasminaLayer.graft`,
:meth:`~KasminaLayer.advance`, :meth:`~KasminaLayer.unload`, :meth:`~KasminaLayer.fossilize`...)
and the checkpoint restore come from :class:`~esper.execution.seed_lifecycle.SeedLifecycle`; the
blend itself is :mod:`esper.execution.seed_blend`. This module binds the forward and reads
telemetry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from esper.contracts import HealthSignal, LayerStats, SeedState
from esper.errors import ConfigurationError
from esper.execution import seed_health
from esper.execution.arguments import check_name, check_seed_settings
from esper.execution.fast_paths import disable_fused_fast_paths, has_hooks
from esper.execution.layer_kind_registry import GraftPoint, supported_layer_names
from esper.execution.layer_kinds import profile_layer
from esper.execution.seed_blend import (
    FossilSeed,
    RunningSeed,
    add_fossils,
    blend,
    blend_sequences,
    running_seeds,
)
from esper.execution.seed_lifecycle import SeedLifecycle

logger = logging.getLogger(__name__)


class KasminaLayer(SeedLifecycle):
    """Wraps one host module (kept as is, never copied) and gives it ``num_seeds`` seeds.

    Args:
        base: the host module; of a registered layer kind (see
            :mod:`esper.execution.layer_kind_registry`).
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
        check_name("layer_name", layer_name)
        profile = profile_layer(base) if isinstance(base, nn.Module) else None
        if profile is None:
            raise ConfigurationError(
                f"layer {layer_name or type(base).__name__!r} is a {type(base).__name__}, which "
                f"cannot carry seeds; supported layer kinds: {supported_layer_names()} (declare "
                "another with esper.register_layer_kind)"
            )
        settings = check_seed_settings(
            num_seeds=num_seeds,
            blend_steps=blend_steps,
            max_retries=max_retries,
            retry_backoff_steps=retry_backoff_steps,
            health_every=health_every,
            where="num_seeds",
        )
        super().__init__(base, profile=profile, layer_name=layer_name, **settings)
        self._reads_input = profile.graft_point is GraftPoint.INPUT
        self._returns_tuple = profile.returns_tuple
        self.inside_fused_module = bool(inside_fused_module)
        self._running_seeds: tuple[RunningSeed, ...] = ()
        self._fossils: tuple[FossilSeed, ...] = ()
        self._select_forward()

    # -- forward -------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Base output plus blended kernels (normally replaced by the bound fast path)."""
        return self._forward_morphed(*args, **kwargs)

    def _select_forward(self) -> None:
        """Bind ``self.forward`` to the cheapest path that is correct for the current state.

        Also rebuilds ``_running_seeds`` and ``_fossils``: per running seed, its kernel and views
        of its alpha and health buffers, so the forward does no indexing or attribute lookups per
        seed. A layer whose running kernels are all fossilized gets :meth:`_forward_fossilized`.
        """
        self._running_seeds, self._fossils = running_seeds(self.seed_layout, self._kernels)
        forward: Callable[..., Any]
        if self._running_seeds or self._record_health:
            forward = self._forward_morphed
        elif self._fossils:
            forward = self._forward_fossilized
        elif has_hooks(self.base):
            forward = self.base  # call it as a module so the base's own hooks still run
        else:
            forward = self.base.forward
        # object.__setattr__: a module assigned through nn.Module.__setattr__ would be registered
        # as a child named "forward".
        object.__setattr__(self, "forward", forward)
        guards = [k for k, h in self._forward_pre_hooks.items() if h is disable_fused_fast_paths]
        kernels_run = bool(self._running_seeds or self._fossils)
        if kernels_run and self.inside_fused_module and not guards:
            self.register_forward_pre_hook(disable_fused_fast_paths)
        elif not kernels_run:
            for key in guards:
                del self._forward_pre_hooks[key]

    def _graft_tensors(
        self, out: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The host's output tensor and the tensor its kernels read (input or output)."""
        base_out = out[0] if self._returns_tuple else out
        if self._reads_input:
            return base_out, args[0] if args else next(iter(kwargs.values()))
        return base_out, base_out

    def _forward_morphed(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base(*args, **kwargs)
        base_out, kernel_in = self._graft_tensors(out, args, kwargs)
        record = self._record_health
        if base_out.is_nested:  # host metadata: TransformerEncoder's nested inference path
            y = blend_sequences(
                base_out,
                kernel_in,
                self._current_running_seeds,
                fossils=self._fossils,
                record=record,
                on_fault=self._on_kernel_fault,
            )
        else:
            y = add_fossils(base_out, kernel_in, self._fossils, on_fault=self._on_kernel_fault)
            y = blend(
                y,
                kernel_in,
                self._running_seeds,
                record=record,
                on_fault=self._on_kernel_fault,
            )
        if record:
            self._record_health = False
            try:
                seed_health.record_output_health(
                    self.seed_layout.layer_health, base_out, self.profile.channel_dim
                )
            except Exception as exc:  # statistics must never take the host's forward down
                logger.warning("layer %r: health sample skipped: %s", self.layer_name, exc)
            self._select_forward()
        if self._returns_tuple:
            return (y, *out[1:])
        return y

    def _forward_fossilized(self, *args: Any, **kwargs: Any) -> Any:
        """Base output plus fossilized kernels only: plain modules, no guard, no statistics."""
        out = self.base(*args, **kwargs)
        base_out, kernel_in = self._graft_tensors(out, args, kwargs)
        if base_out.is_nested:  # per sequence, as the morphed path does it
            y = blend_sequences(
                base_out,
                kernel_in,
                self._current_running_seeds,
                fossils=self._fossils,
                record=False,
                on_fault=self._on_kernel_fault,
            )
        else:
            y = add_fossils(base_out, kernel_in, self._fossils, on_fault=self._on_kernel_fault)
        return (y, *out[1:]) if self._returns_tuple else y

    def _current_running_seeds(self) -> tuple[RunningSeed, ...]:
        """The running seeds now (a fault in one sequence of a nested batch rebinds them)."""
        return self._running_seeds

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
        """Copies and pickles rebuild the bound forward and buffer views (see ``__setstate__``);
        loads in flight stay behind (see :meth:`SeedLifecycle.__getstate__`)."""
        state = super().__getstate__()
        state.pop("forward", None)
        state["_running_seeds"] = ()
        state["_fossils"] = ()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._select_forward()

    def _apply(self, fn: Any, recurse: bool = True) -> KasminaLayer:
        """``.to()``/``.float()``/...: buffers are replaced, so rebind the per-seed views."""
        super()._apply(fn, recurse)
        self._select_forward()
        return self

    # -- telemetry -----------------------------------------------------------------------------

    def health_tensor(self) -> torch.Tensor:
        """This window's accumulators and the base grad norm as one flat device tensor (see
        :func:`esper.execution.seed_health.health_tensor`)."""
        return seed_health.health_tensor(self.base, self.seed_layout)

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
            if self.seed_layout.slots[seed_idx].state.runs_kernel:
                self._on_kernel_fault(seed_idx, FloatingPointError("kernel output was not finite"))
        signal = seed_health.build_health_signal(
            values,
            self.seed_layout.slots,
            layer_name=self.layer_name,
            layer_kind=self.profile.kind,
            step=step,
            timestamp=timestamp,
        )
        self.seed_layout.reset_health()
        return signal

    def stats(self) -> LayerStats:
        """Parameter counts and seed states of this layer."""
        counts = dict.fromkeys(SeedState, 0)
        for slot in self.seed_layout.slots:
            counts[slot.state] += 1
        return LayerStats(
            layer_name=self.layer_name,
            layer_kind=self.profile.kind,
            base_parameters=sum(p.numel() for p in self.base.parameters()),
            kernel_parameters=sum(
                p.numel() for grafted in self._kernels if grafted for p in grafted.parameters()
            ),
            seeds_by_state=counts,
            kernel_ids=tuple(slot.kernel_id for slot in self.seed_layout.slots),
        )
