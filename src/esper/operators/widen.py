"""The widen operator: *k* more units in a layer and its consumer, blended in, then merged.

Lifecycle (the seed lifecycle's states, one widen per producer layer at a time)::

    widen(layer, k) ──► BLENDING (α ramps 0 → 1 over blend_steps) ──► ACTIVE ──► FOSSILIZED
                              └──────────────── cull ◄──────────────┘   (merged: plain wider modules)

* ``widen`` finds A's consumer B and the norm/activations between (:mod:`~esper.operators.dataflow`),
  initialises the new units (:mod:`~esper.operators.widen_init`) and wraps A, the norm and B
  (:mod:`~esper.operators.widen_modules`): the host modules stay as they are, the new units are
  separate parameters, the output is bit-identical at α = 0 (LayerNorm: to float rounding).
  Every check and every new tensor is made before the model changes; a failure leaves it as it was.
* the new units' parameters join each attached optimizer as one group (tagged
  ``esper_seed="widen:<layer>:0"``) through the model's graft listeners, as a kernel's do;
* ``cull`` puts the host modules back (the host is exactly what it was, with its own training
  since), and drops the group with its state;
* ``fossilize`` (from ACTIVE) replaces the wrappers by plain wider ``nn.Linear``/``nn.Conv*``/norms
  (:mod:`~esper.operators.widen_merge`) and moves the optimizer state into them
  (:mod:`~esper.operators.optimizer_surgery`).

A layer wrapped by Esper (a :class:`~esper.execution.KasminaLayer`) is widened through its base
module; its seeds must be dormant.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from esper.contracts import SeedState
from esper.errors import ConfigurationError, IllegalTransitionError
from esper.execution import KasminaLayer
from esper.execution.layer_kinds import profile_layer
from esper.operators.dataflow import WidenPath, find_widen_path, host_module
from esper.operators.optimizer_surgery import replace_parameter
from esper.operators.widen_init import (
    WIDEN_INITS,
    GradMaxBatch,
    NewUnits,
    gradmax_units,
    random_units,
    zero_units,
)
from esper.operators.widen_merge import merge_widened
from esper.operators.widen_modules import (
    WidenedBatchNorm,
    WidenedConsumer,
    WidenedLayerNorm,
    WidenedProducer,
)

logger = logging.getLogger(__name__)

WIDEN_SEED = 0
"""The seed index a widen's optimizer group is tagged with (``widen:<layer>:0``)."""

REPLAY_INIT = "zeros"
"""Internal init of a widen replayed from a checkpoint: zeros, overwritten by the saved tensors
(and drawing nothing from the random number generators, so a resume stays exact)."""


@dataclass
class WidenGraft:
    """One widen in progress (or kept): what it touches and where it is in its lifecycle.

    Attributes:
        path: producer, norm and consumer names.
        k: number of new units.
        init: how the new units were initialised (``random`` or ``gradmax``).
        blend_steps: steps over which α ramps from 0 to 1.
        state: BLENDING, ACTIVE, FOSSILIZED, or DORMANT once culled.
        steps_done: steps blended so far.
        wrappers: the wrappers by module name, while not merged.
        hosts: the modules the wrappers replaced (host modules or seeded layers), by name.
        seconds: wall time of the widen event itself (checks, init and surgery).
    """

    path: WidenPath
    k: int
    init: str
    blend_steps: int
    state: SeedState = SeedState.BLENDING
    steps_done: int = 0
    wrappers: dict[str, nn.Module] = field(default_factory=dict)
    hosts: dict[str, nn.Module] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def layer_name(self) -> str:
        """The widened (producer) layer."""
        return self.path.producer

    @property
    def group_name(self) -> str:
        """The name the new units' optimizer group is tagged with (before ``:0``)."""
        return f"widen:{self.path.producer}"

    @property
    def alpha(self) -> float:
        """The blend weight now (host-side value)."""
        if self.blend_steps == 0 or self.state is not SeedState.BLENDING:
            return 1.0 if self.state is not SeedState.DORMANT else 0.0
        return min(1.0, self.steps_done / self.blend_steps)

    def new_unit_parameters(self) -> list[nn.Parameter]:
        """The parameters of the new units (empty once merged or culled)."""
        return [p for wrapper in self.wrappers.values() for name, p in _own(wrapper)]

    def record(self) -> dict[str, object]:
        """What a checkpoint keeps to rebuild this widen's structure."""
        return {
            "layer": self.path.producer,
            "k": self.k,
            "init": self.init,
            "blend_steps": self.blend_steps,
            "state": self.state.name,
            "steps_done": self.steps_done,
        }


def build_widen(
    root: nn.Module,
    layer_name: str,
    k: int,
    *,
    init: str = "random",
    blend_steps: int = 20,
    gradmax_batches: Iterable[GradMaxBatch] = (),
) -> WidenGraft:
    """Check a widen of ``layer_name`` by ``k`` units and build its wrappers (model unchanged).

    Raises:
        ConfigurationError: a bad argument, or ``"cannot widen <layer>: <why>"``.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigurationError(f"widen needs k >= 1 new units, got {k!r}")
    if init not in (*WIDEN_INITS, REPLAY_INIT):
        raise ConfigurationError(f"unknown widen init {init!r}; choose one of {list(WIDEN_INITS)}")
    if not isinstance(blend_steps, int) or isinstance(blend_steps, bool) or blend_steps < 0:
        raise ConfigurationError(f"blend_steps must be an int >= 0, got {blend_steps!r}")
    modules = dict(root.named_modules())
    if layer_name in modules:
        _check_not_in_progress(layer_name, layer_name, modules[layer_name])
    path = find_widen_path(root, layer_name)
    names = [n for n in (path.producer, path.norm, path.consumer) if n is not None]
    for name in names:
        _check_dormant(layer_name, name, modules[name])
    producer = host_module(modules[path.producer])
    consumer = host_module(modules[path.consumer])
    units: NewUnits
    if init == REPLAY_INIT:
        units = zero_units(producer, consumer, k)
    elif init == "gradmax":
        units = gradmax_units(root, path, producer, consumer, k, gradmax_batches)
    else:
        units = random_units(producer, consumer, k)
    graft = WidenGraft(path, k, init, blend_steps)
    graft.hosts = {name: modules[name] for name in names}
    graft.wrappers[path.producer] = WidenedProducer(producer, units.fan_in, units.bias)
    if path.norm is not None:
        norm = host_module(modules[path.norm])
        if isinstance(norm, nn.LayerNorm):
            graft.wrappers[path.norm] = WidenedLayerNorm(norm, k)
        else:
            assert isinstance(norm, nn.BatchNorm1d | nn.BatchNorm2d)
            graft.wrappers[path.norm] = WidenedBatchNorm(norm, k)
    graft.wrappers[path.consumer] = WidenedConsumer(consumer, units.fan_out)
    set_alpha(graft, graft.alpha)
    return graft


def install(root: nn.Module, graft: WidenGraft) -> None:
    """Put the graft's wrappers in place of the host modules (nothing else can fail here)."""
    for name, wrapper in graft.wrappers.items():
        _put(root, name, graft.hosts[name], wrapper)


def set_alpha(graft: WidenGraft, value: float) -> None:
    """Write α into the wrappers' device buffers (no host sync)."""
    for wrapper in graft.wrappers.values():
        if isinstance(wrapper, WidenedConsumer | WidenedLayerNorm):
            wrapper.alpha.fill_(value)


def advance(graft: WidenGraft) -> bool:
    """One step of a BLENDING graft's ramp; ``True`` when it just became ACTIVE."""
    if graft.state is not SeedState.BLENDING:
        return False
    graft.steps_done += 1
    if graft.steps_done >= graft.blend_steps:
        graft.state = SeedState.ACTIVE
    set_alpha(graft, graft.alpha)
    return graft.state is SeedState.ACTIVE


def cull(root: nn.Module, graft: WidenGraft) -> None:
    """Put the host modules back (BLENDING/ACTIVE -> DORMANT)."""
    _require(graft, (SeedState.BLENDING, SeedState.ACTIVE), "cull")
    for name, wrapper in graft.wrappers.items():
        _put(root, name, graft.hosts[name], wrapper.host)  # type: ignore[arg-type]
    graft.wrappers = {}
    graft.state = SeedState.DORMANT


def fossilize(
    root: nn.Module, graft: WidenGraft, optimizers: Sequence[torch.optim.Optimizer]
) -> None:
    """Merge an ACTIVE graft into plain wider modules; the optimizers' state follows."""
    _require(graft, (SeedState.ACTIVE,), "fossilize")
    started = time.perf_counter()
    merged = {name: merge_widened(wrapper) for name, wrapper in graft.wrappers.items()}
    for name, result in merged.items():
        for change in result.changes:
            for optimizer in optimizers:
                replace_parameter(optimizer, change.old, change.new, change.pieces)
        host = graft.hosts[name]
        if isinstance(host, KasminaLayer):
            host.profile = profile_layer(result.module)  # type: ignore[assignment]
        _put(root, name, host, result.module)
        if not isinstance(host, KasminaLayer):
            graft.hosts[name] = result.module
    graft.wrappers = {}
    graft.state = SeedState.FOSSILIZED
    graft.seconds += time.perf_counter() - started


def _put(root: nn.Module, name: str, slot: nn.Module, module: nn.Module) -> None:
    """Make ``module`` do the work at ``name``: as the base of a seeded layer ``slot``, else in
    place of ``slot`` in its parent."""
    if isinstance(slot, KasminaLayer):
        slot.base = module
        slot._select_forward()
        return
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _check_dormant(layer_name: str, name: str, module: nn.Module) -> None:
    if isinstance(module, KasminaLayer) and any(
        s is not SeedState.DORMANT for s in module.seed_states
    ):
        states = ", ".join(s.name for s in module.seed_states)
        raise ConfigurationError(
            f"cannot widen {layer_name!r}: {name!r} has grafted kernels (seeds: {states}); widen "
            "it while its seeds are dormant, or cull or unwrap the kernels first"
        )
    _check_not_in_progress(layer_name, name, module)


def _check_not_in_progress(layer_name: str, name: str, module: nn.Module) -> None:
    if type(host_module(module)).__module__.startswith("esper.operators"):
        raise ConfigurationError(
            f"cannot widen {layer_name!r}: {name!r} is part of a widen still in progress; "
            "fossilize or cull that one first"
        )


def _require(graft: WidenGraft, allowed: tuple[SeedState, ...], action: str) -> None:
    if graft.state not in allowed:
        raise IllegalTransitionError(
            f"cannot {action} the widen of {graft.layer_name!r}: it is {graft.state.name}, and "
            f"{action} needs {' or '.join(s.name for s in allowed)}; nothing was changed"
        )


def _own(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """A wrapper's own parameters (the new units), not its host's."""
    return [(n, p) for n, p in module.named_parameters(recurse=False)]
