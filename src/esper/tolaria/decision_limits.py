"""Training-side decision limits: the run's safety limits, applied again to every decision received.

Tamiyo's safety gates run in the controller, which may be another process on the other side of a
bus; the growth executor applies what arrives on ``control.kasmina.commands``. So before anything
is compiled, loaded or grafted, the training side checks each decision against its own run's
limits, independently of the controller, and refuses what breaks one with a
:class:`~esper.contracts.DecisionRefusal` naming the gate:

=====================  ===========================================================================
gate                   refuses when
=====================  ===========================================================================
``unknown_layer``      the model has no seeded layer of that name
``unknown_seed``       the seed index is outside the layer's seeds
``unknown_blueprint``  a GERMINATE names no blueprint, or a family that is not registered (or not
                       among the run's ``families``)
``invalid_blueprint``  the family rejects the blueprint's parameters, or cannot target the layer
``rate_limit``         ``max_adaptations`` germinations were accepted in the last ``window_steps``
``parameter_budget``   grafted + in-flight + new kernel parameters would exceed
                       ``max_parameter_fraction`` of the host's parameters
``byte_budget``        grafted + in-flight + new kernel bytes (parameters and buffers) would exceed
                       ``max_kernel_bytes`` (default: ``max_parameter_fraction`` of the host's
                       parameter bytes)
``operator_disabled``  a widen/deepen decision in a run whose ``growth.operators`` do not allow it
``invalid_operator``   the widen/deepen cannot apply to the layer (e.g. ``cannot widen ...``)
=====================  ===========================================================================

A widen's or deepen's cost (what it adds, counted in the same budgets as kernels) comes from the
host's shapes (:mod:`esper.operators.operator_plan`). A new kernel's cost comes from its spec and the layer's target, built on the meta device: no
memory is allocated and nothing is compiled to learn it. FOSSILIZE and CULL only need a layer
and a seed that exist. :func:`check_decision` is the pure verdict (decision + limits + the
model's state in, refusal or ``None`` out); :class:`DecisionGuard` is the thin shell the executor
holds: it reads the model's state and remembers the germinations it let through (for the rate
limit, in :meth:`DecisionGuard.state_dict`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from esper.blueprints.registry import build_empty_kernel, family_names
from esper.contracts import (
    AdaptationAction,
    AdaptationDecision,
    BlueprintSpec,
    DecisionRefusal,
    GrowthOperator,
    KernelTarget,
    SeedState,
)
from esper.contracts.bounds import text_within_bounds
from esper.core import MorphableModel
from esper.errors import BlueprintError
from esper.tamiyo.safety import GATE_PARAMETER_BUDGET, GATE_RATE_LIMIT, SafetyConfig

GATE_UNKNOWN_LAYER = "unknown_layer"
GATE_UNKNOWN_SEED = "unknown_seed"
GATE_UNKNOWN_BLUEPRINT = "unknown_blueprint"
GATE_INVALID_BLUEPRINT = "invalid_blueprint"
GATE_BYTE_BUDGET = "byte_budget"
GATE_OPERATOR_DISABLED = "operator_disabled"
GATE_INVALID_OPERATOR = "invalid_operator"

_NOT_YET_GRAFTED = (SeedState.DORMANT, SeedState.LOADING)


@dataclass(frozen=True)
class DecisionLimits:
    """The limits every received decision must respect.

    Attributes:
        max_parameter_fraction: kernel parameters may reach at most this fraction of the host's.
        max_adaptations: germinations accepted within any ``window_steps`` steps.
        window_steps: length of the rate limit's window, in steps.
        max_kernel_bytes: bytes kernels may take (``None``: ``max_parameter_fraction`` of the
            host's parameter bytes).
        families: blueprint families a decision may use (``None``: every registered family).
        operators: the :class:`~esper.contracts.GrowthOperator` values decisions may use
            (default: residual kernels only).
    """

    max_parameter_fraction: float
    max_adaptations: int
    window_steps: int
    max_kernel_bytes: int | None = None
    families: frozenset[str] | None = None
    operators: frozenset[str] = frozenset({GrowthOperator.RESIDUAL.value})

    @classmethod
    def from_safety(cls, config: SafetyConfig) -> DecisionLimits:
        """The limits a run's :class:`SafetyConfig` states (its budget and its rate limit)."""
        return cls(
            max_parameter_fraction=config.max_parameter_fraction,
            max_adaptations=config.max_adaptations,
            window_steps=config.window_steps,
        )


@dataclass(frozen=True)
class KernelCost:
    """What a kernel (or a set of kernels) costs: parameters, and bytes of parameters + buffers."""

    parameters: int = 0
    bytes: int = 0

    def __add__(self, other: KernelCost) -> KernelCost:
        return KernelCost(self.parameters + other.parameters, self.bytes + other.bytes)


@dataclass(frozen=True)
class GrowthState:
    """The model as the limits see it.

    Attributes:
        step: the step boundary the decision is received at.
        layers: seeded layers by name: their kernel target and seed count.
        base_parameters: parameters of the host.
        base_bytes: bytes of the host's parameters.
        grafted: kernels grafted now.
        in_flight: germinations accepted but not grafted yet.
        germinations: steps of the germinations accepted so far (see :meth:`DecisionGuard.
            record_germination`).
    """

    step: int
    layers: Mapping[str, tuple[KernelTarget, int]]
    base_parameters: int
    base_bytes: int
    grafted: KernelCost
    in_flight: KernelCost
    germinations: tuple[int, ...] = ()


@dataclass(frozen=True)
class LimitRefusal:
    """Which limit a decision breaks (``gate``) and why."""

    gate: str
    reason: str


def kernel_cost(spec: BlueprintSpec, target: KernelTarget) -> KernelCost:
    """Parameters and bytes of the kernel ``spec`` builds for ``target`` (meta device; cached).

    Raises:
        BlueprintError: the family is unknown, rejects the parameters, or cannot target it.
    """
    return _kernel_cost(spec.canonical_json(), target.model_dump_json())


@functools.lru_cache(maxsize=512)
def _kernel_cost(spec_json: str, target_json: str) -> KernelCost:
    spec = BlueprintSpec.model_validate_json(spec_json)
    module = build_empty_kernel(spec, KernelTarget.model_validate_json(target_json))
    tensors = [*module.parameters(), *module.buffers()]
    return KernelCost(
        parameters=sum(p.numel() for p in module.parameters()),
        bytes=sum(t.numel() * t.element_size() for t in tensors),
    )


def decision_step(decision: AdaptationDecision, step: int) -> int:
    """The step a decision counts at: its own, but never later than where it was received."""
    return min(decision.step, step)


def check_decision(
    decision: AdaptationDecision,
    limits: DecisionLimits,
    state: GrowthState,
    operator_cost: KernelCost | str | None = None,
) -> LimitRefusal | None:
    """The first limit ``decision`` breaks, or ``None`` when it respects them all (pure).

    ``operator_cost`` is what a widen/deepen decision adds (:mod:`~esper.operators.operator_plan`),
    or why it cannot apply; residual kernels are costed from their blueprint.
    """
    layer = state.layers.get(decision.layer_name)
    if layer is None:
        known = ", ".join(repr(name) for name in state.layers)
        return LimitRefusal(
            GATE_UNKNOWN_LAYER, f"the model has no seeded layer {decision.layer_name!r} ({known})"
        )
    target, num_seeds = layer
    if not 0 <= decision.seed_idx < num_seeds:
        return LimitRefusal(
            GATE_UNKNOWN_SEED,
            f"seed {decision.seed_idx} does not exist: layer {decision.layer_name!r} has "
            f"{num_seeds} seeds (0..{num_seeds - 1})",
        )
    if decision.action is not AdaptationAction.GERMINATE:
        return None
    if decision.operator.value not in limits.operators:
        return LimitRefusal(
            GATE_OPERATOR_DISABLED,
            f"this run does not use {decision.operator}; it allows {sorted(limits.operators)} "
            "(growth.operators in the run config)",
        )
    if decision.operator is not GrowthOperator.RESIDUAL:
        if not isinstance(operator_cost, KernelCost):
            return LimitRefusal(GATE_INVALID_OPERATOR, operator_cost or "no cost was measured")
        return _budget_refusal(decision, operator_cost, limits, state)
    spec = decision.blueprint
    families = set(family_names())
    if limits.families is not None:
        families &= limits.families
    if spec is None or spec.family not in families:
        what = "names no blueprint" if spec is None else f"uses family {spec.family!r}"
        return LimitRefusal(
            GATE_UNKNOWN_BLUEPRINT,
            f"the germination {what}; this run builds: {', '.join(sorted(families))}",
        )
    try:
        cost = kernel_cost(spec, target)
    except BlueprintError as exc:  # parameters the family rejects, or a target it cannot serve
        return LimitRefusal(GATE_INVALID_BLUEPRINT, str(exc))
    return _budget_refusal(decision, cost, limits, state)


def _budget_refusal(
    decision: AdaptationDecision, cost: KernelCost, limits: DecisionLimits, state: GrowthState
) -> LimitRefusal | None:
    start = decision_step(decision, state.step) - limits.window_steps
    recent = sum(1 for step in state.germinations if step > start)
    if recent >= limits.max_adaptations:
        return LimitRefusal(
            GATE_RATE_LIMIT,
            f"{recent} germinations were accepted in the last {limits.window_steps} steps "
            f"(limit {limits.max_adaptations})",
        )
    total = state.grafted + state.in_flight + cost
    budget = limits.max_parameter_fraction * state.base_parameters
    if total.parameters > budget:
        return LimitRefusal(
            GATE_PARAMETER_BUDGET,
            f"kernel parameters would reach {total.parameters} ({state.grafted.parameters} "
            f"grafted + {state.in_flight.parameters} in flight + {cost.parameters} new), over "
            f"the budget of {limits.max_parameter_fraction:g} x {state.base_parameters} host "
            "parameters (max_parameter_fraction)",
        )
    byte_budget = (
        limits.max_kernel_bytes
        if limits.max_kernel_bytes is not None
        else limits.max_parameter_fraction * state.base_bytes
    )
    if total.bytes > byte_budget:
        return LimitRefusal(
            GATE_BYTE_BUDGET,
            f"kernel memory would reach {total.bytes} bytes ({state.grafted.bytes} grafted + "
            f"{state.in_flight.bytes} in flight + {cost.bytes} new), over the budget of "
            f"{byte_budget:.0f} bytes",
        )
    return None


def training_refusal(decision: AdaptationDecision, gate: str, reason: str) -> DecisionRefusal:
    """The :class:`DecisionRefusal` the training side publishes for ``decision``."""
    return DecisionRefusal(
        run_id=decision.run_id,
        decision_id=decision.decision_id,
        step=decision.step,
        layer_name=decision.layer_name,
        action=decision.action,
        gate=gate,
        reason=text_within_bounds(reason),  # e.g. a compile job's error: any length
        policy=decision.policy,
    )


class InFlightGermination(Protocol):
    """A germination the executor accepted (its record): the decision and the seed it took."""

    @property
    def decision(self) -> AdaptationDecision: ...

    @property
    def seed_idx(self) -> int: ...


class OperatorBudget(Protocol):
    """The widen/deepen side of a run, as the limits see it (``OperatorGrowth``)."""

    def grafted_cost(self) -> KernelCost:
        """What the widen/deepen grafts live or kept so far added."""
        ...

    def cost(self, decision: AdaptationDecision) -> KernelCost | str:
        """What ``decision`` would add, or why it cannot apply."""
        ...


class DecisionGuard:
    """Checks the decisions one model receives against the run's limits.

    Args:
        model: the morphable model decisions are applied to (read only).
        limits: the limits (replaceable: ``guard.limits = ...``).
    """

    def __init__(self, model: MorphableModel, limits: DecisionLimits) -> None:
        self.model = model
        self.limits = limits
        base = list(model.base_parameters())
        self.base_parameters = sum(p.numel() for p in base)
        self.base_bytes = sum(p.numel() * p.element_size() for p in base)
        self._germinations: list[int] = []

    @classmethod
    def for_run(cls, model: MorphableModel, config: SafetyConfig) -> DecisionGuard:
        """A guard applying the limits of a run's :class:`SafetyConfig`."""
        return cls(model, DecisionLimits.from_safety(config))

    def check(
        self,
        decision: AdaptationDecision,
        step: int,
        in_flight: Iterable[InFlightGermination],
        operators: OperatorBudget | None = None,
    ) -> LimitRefusal | None:
        """:func:`check_decision` against the model now, the germinations in flight and the
        widen/deepen grafts ``operators`` holds (live or kept)."""
        state = self.state(step, in_flight)
        cost: KernelCost | str | None = None
        if operators is not None:
            state = replace(state, grafted=state.grafted + operators.grafted_cost())
            if decision.operator is not GrowthOperator.RESIDUAL:
                cost = operators.cost(decision)
        return check_decision(decision, self.limits, state, cost)

    def state(self, step: int, in_flight: Iterable[InFlightGermination]) -> GrowthState:
        """The model's :class:`GrowthState` at ``step``."""
        model = self.model
        grafted = KernelCost()
        for layer in {id(model.layer(n)): model.layer(n) for n in model.layer_names}.values():
            tensors = [*layer.seeds.parameters(), *layer.seeds.buffers()]
            grafted += KernelCost(
                sum(p.numel() for p in layer.seeds.parameters()),
                sum(t.numel() * t.element_size() for t in tensors),
            )
        pending = KernelCost()
        for record in in_flight:
            decision = record.decision
            if decision.blueprint is None or decision.layer_name not in model.layers:
                continue
            if model.seed_state(decision.layer_name, record.seed_idx) in _NOT_YET_GRAFTED:
                target = model.layer(decision.layer_name).target()
                pending += kernel_cost(decision.blueprint, target)
        return GrowthState(
            step=step,
            layers={
                name: (model.layer(name).target(), model.layer(name).num_seeds)
                for name in model.layer_names
            },
            base_parameters=self.base_parameters,
            base_bytes=self.base_bytes,
            grafted=grafted,
            in_flight=pending,
            germinations=tuple(self._germinations),
        )

    def record_germination(self, decision: AdaptationDecision, step: int) -> None:
        """Count a germination the executor accepted (received at ``step``) in the rate limit."""
        self._germinations.append(decision_step(decision, step))
        horizon = max(self._germinations) - self.limits.window_steps
        self._germinations = [s for s in self._germinations if s > horizon]

    def state_dict(self) -> dict[str, Any]:
        """The accepted germinations' steps, as plain JSON."""
        return {"germinations": list(self._germinations)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (an empty mapping: nothing recorded)."""
        self._germinations = [int(s) for s in state.get("germinations", [])]
