"""Widen and deepen decisions on the training side: applied through the SDK, judged like a graft.

A GERMINATE decision whose ``operator`` is WIDEN or DEEPEN is not a seed kernel: nothing is
compiled or loaded. Once the run's limits let it through (:class:`~esper.tolaria.decision_limits.
DecisionGuard`, with :meth:`OperatorGrowth.cost` as its price), :meth:`OperatorGrowth.start`
calls ``model.widen(...)`` or ``model.deepen(...)`` at the step boundary (α = 0: the model's
output is unchanged) and ``model.step()`` ramps it in. When it is ACTIVE, it is evaluated for
``evaluation_steps`` steps and judged by :func:`~esper.tolaria.graft_judgement.judge_graft`, the
verdict on kernels: keep -> ``model.widenings.fossilize`` / ``model.fossilize_block`` (plain
wider/deeper modules, optimizer state moved by the SDK), cull -> ``model.widenings.cull`` /
``model.cull_block`` (the host modules and their optimizer groups as they were).

A failing operator never stops training: the SDK checks before it changes anything, and any
error is answered with a :class:`~esper.contracts.DecisionRefusal` (gate ``operator_failed``),
undoing the graft if it was already installed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from esper.contracts import (
    AdaptationDecision,
    DecisionRefusal,
    GrowthOperator,
    RewardReport,
    SeedState,
    Topic,
)
from esper.core import MorphableModel
from esper.errors import ConfigurationError, EsperError
from esper.operators.operator_plan import OperatorPlan, plan_operator
from esper.tamiyo.safety import SafetyConfig
from esper.tolaria.controller_feed import ControllerFeed
from esper.tolaria.decision_limits import DecisionGuard, KernelCost, training_refusal
from esper.tolaria.germination import Loss, RecentSteps, materialize, window_evidence
from esper.tolaria.graft_judgement import judge_graft
from esper.tolaria.operator_config import OperatorsSection

logger = logging.getLogger(__name__)

GATE_OPERATOR_FAILED = "operator_failed"


@dataclass
class OperatorGraft:
    """One widen or deepen from its decision to its verdict."""

    decision: AdaptationDecision
    plan: OperatorPlan
    block_id: int | None = None
    losses_before: list[Loss] = field(default_factory=list)
    step_times_before: list[float] = field(default_factory=list)
    metrics_before: dict[str, float] = field(default_factory=dict)
    active_step: int | None = None
    losses_after: list[Loss] = field(default_factory=list)
    step_times_after: list[float] = field(default_factory=list)


@dataclass
class OperatorStep:
    """What the operators did at one step boundary."""

    rewards: list[RewardReport] = field(default_factory=list)
    refusals: list[DecisionRefusal] = field(default_factory=list)


class OperatorGrowth:
    """The widen/deepen grafts of one run (the growth executor holds one).

    Args:
        model: the morphable model, its optimizer attached (the SDK moves its groups).
        safety: the run's thresholds (the loss-spike gate of the verdict).
        evaluation_steps: steps an ACTIVE graft is evaluated before its verdict.
        recent: the executor's recent losses and step times (the baseline before a graft).
        counters: the executor's counters (``widened``, ``deepened``, ``fossilized``, ...).
        feed: where rewards and refusals are published.
        evaluate: the validation hook (see ``GrowthExecutor``), or ``None``.
    """

    def __init__(
        self,
        model: MorphableModel,
        *,
        safety: SafetyConfig,
        evaluation_steps: int,
        recent: RecentSteps,
        counters: Counter[str],
        feed: ControllerFeed,
        evaluate: Callable[[], Mapping[str, float]] | None = None,
    ) -> None:
        self.model = model
        self.safety = safety
        self.evaluation_steps = evaluation_steps
        self.recent = recent
        self.counters = counters
        self.feed = feed
        self.evaluate = evaluate
        self.options = OperatorsSection()
        self.live: dict[str, OperatorGraft] = {}
        self.kept = KernelCost()
        self._base_parameters = sum(p.numel() for p in model.base_parameters())

    def allow(self, options: OperatorsSection, guard: DecisionGuard) -> None:
        """Use the run's ``growth.operators``: its blend steps and the operators ``guard`` lets
        through."""
        self.options = options
        allowed = {GrowthOperator.RESIDUAL.value} if options.residual else set()
        allowed |= {GrowthOperator.WIDEN.value} if options.widen else set()
        allowed |= {GrowthOperator.DEEPEN.value} if options.deepen else set()
        guard.limits = replace(guard.limits, operators=frozenset(allowed))

    # -- budgets (OperatorBudget) --------------------------------------------------------------

    def cost(self, decision: AdaptationDecision) -> KernelCost | str:
        """What ``decision`` would add, or why it cannot apply (the model is not changed)."""
        try:
            plan = plan_operator(self.model.model, decision)
        except (EsperError, ValueError) as exc:
            return str(exc)
        return KernelCost(plan.parameters, plan.bytes)

    def grafted_cost(self) -> KernelCost:
        """Parameters and bytes of the live grafts and of the kept ones."""
        live = KernelCost()
        for graft in self.live.values():
            live += KernelCost(graft.plan.parameters, graft.plan.bytes)
        return self.kept + live

    # -- the lifecycle -------------------------------------------------------------------------

    def start(self, decision: AdaptationDecision) -> DecisionRefusal | None:
        """Apply a WIDEN/DEEPEN decision the limits let through (α = 0); a refusal on failure."""
        try:
            plan = plan_operator(self.model.model, decision)
            graft = OperatorGraft(decision, plan)
            self._apply(graft)
        except Exception as exc:  # never crash training because growth failed
            logger.warning("%s of %r failed: %s", decision.operator, decision.layer_name, exc)
            return self._refuse(decision, f"{decision.operator} failed: {exc}")
        graft.losses_before = list(self.recent.losses)
        graft.step_times_before = list(self.recent.step_times)
        graft.metrics_before = dict(self.evaluate()) if self.evaluate else {}
        self.live[decision.decision_id] = graft
        self.counters["widened" if plan.operator is GrowthOperator.WIDEN else "deepened"] += 1
        logger.info(
            "%s %r (%s, %d new parameters) for decision %s",
            plan.operator, plan.layer_name, plan.init, plan.parameters, decision.decision_id[:8],
        )  # fmt: skip
        return None

    def advance(self, step: int, loss: Loss | None, interval: float | None) -> OperatorStep:
        """Evaluate the live grafts one more step; judge those whose window ended."""
        done = OperatorStep()
        for decision_id, graft in list(self.live.items()):
            state = self._state(graft)
            if graft.active_step is None:
                if state is SeedState.ACTIVE:
                    graft.active_step = step
                continue
            if loss is not None:
                graft.losses_after.append(loss)
            if interval is not None:
                graft.step_times_after.append(interval)
            if step - graft.active_step >= self.evaluation_steps:
                del self.live[decision_id]
                self._finish(graft, step, done)
        return done

    def _finish(self, graft: OperatorGraft, step: int, done: OperatorStep) -> None:
        evidence = window_evidence(
            graft,
            step,
            metrics_after=dict(self.evaluate()) if self.evaluate else {},
            kernel_parameters=graft.plan.parameters,
            base_parameters=self._base_parameters,
        )
        verdict = judge_graft(evidence, safety=self.safety)
        try:
            self._keep(graft) if verdict.keep else self._undo(graft)
        except Exception as exc:  # a failed merge: drop the graft, keep training
            logger.warning("verdict on %r failed: %s", graft.plan.layer_name, exc)
            done.refusals.append(self._refuse(graft.decision, f"verdict failed: {exc}"))
            self._undo_quietly(graft)
            return
        if verdict.keep:
            self.kept += KernelCost(graft.plan.parameters, graft.plan.bytes)
        self.counters["fossilized" if verdict.keep else "culled"] += 1
        self.feed.publish(Topic.CONTROL_TAMIYO_REWARDS, verdict.report)
        done.rewards.append(verdict.report)
        if verdict.rollback is not None:
            self.counters["rolled_back"] += 1
            self.feed.publish(Topic.CONTROL_TAMIYO_REFUSALS, verdict.rollback)
            done.refusals.append(verdict.rollback)

    # -- the SDK -------------------------------------------------------------------------------

    def _apply(self, graft: OperatorGraft) -> None:
        plan, blend = graft.plan, self.options.blend_steps
        if plan.operator is GrowthOperator.WIDEN:
            self.model.widen(plan.layer_name, plan.units, init=plan.init, blend_steps=blend)
        elif plan.stack is not None:  # a copy of the block holding the layer, right above it
            graft.block_id = self.model.deepen(
                into=plan.stack, index=plan.index + 1, init="copy", copy_from=plan.index,
                blend_steps=max(1, blend),
            ).block_id  # fmt: skip
        else:
            graft.block_id = self.model.deepen(
                after=plan.layer_name, init="fresh", blend_steps=max(1, blend)
            ).block_id

    def _state(self, graft: OperatorGraft) -> SeedState:
        if graft.block_id is None:
            return self.model.widenings.get(graft.plan.layer_name).state
        return next(
            (b.state for b in self.model.inserted_blocks if b.block_id == graft.block_id),
            SeedState.DORMANT,
        )

    def _keep(self, graft: OperatorGraft) -> None:
        if graft.block_id is None:
            self.model.widenings.fossilize(graft.plan.layer_name)
        else:
            self.model.fossilize_block(graft.block_id)

    def _undo(self, graft: OperatorGraft) -> None:
        if graft.block_id is None:
            self.model.widenings.cull(graft.plan.layer_name)
        else:
            self.model.cull_block(graft.block_id)

    def _undo_quietly(self, graft: OperatorGraft) -> None:
        try:
            self._undo(graft)
        except (ConfigurationError, EsperError, RuntimeError) as exc:
            logger.warning("could not cull %r: %s", graft.plan.layer_name, exc)

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The live grafts and the kept cost as plain JSON (the model's own ``state_dict`` holds
        the widens and blocks themselves)."""
        return {
            "kept": [self.kept.parameters, self.kept.bytes],
            "live": [
                {
                    "decision": g.decision.model_dump(mode="json"),
                    "plan": {**asdict(g.plan), "operator": str(g.plan.operator)},
                    "block_id": g.block_id,
                    "active_step": g.active_step,
                    "losses_before": materialize(g.losses_before),
                    "losses_after": materialize(g.losses_after),
                    "metrics_before": dict(g.metrics_before),
                }
                for g in self.live.values()
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (empty: nothing live, nothing kept)."""
        parameters, size = state.get("kept", [0, 0])
        self.kept = KernelCost(int(parameters), int(size))
        self.live = {}
        for saved in state.get("live", []):
            plan = OperatorPlan(
                **{**saved["plan"], "operator": GrowthOperator(saved["plan"]["operator"])}
            )
            graft = OperatorGraft(
                AdaptationDecision.model_validate(saved["decision"]), plan,
                block_id=saved["block_id"], active_step=saved["active_step"],
                losses_before=[float(x) for x in saved["losses_before"]],
                losses_after=[float(x) for x in saved["losses_after"]],
                metrics_before={str(k): float(v) for k, v in saved["metrics_before"].items()},
            )  # fmt: skip
            self.live[graft.decision.decision_id] = graft

    def _refuse(self, decision: AdaptationDecision, reason: str) -> DecisionRefusal:
        self.counters["refused"] += 1
        refusal = training_refusal(decision, GATE_OPERATOR_FAILED, reason)
        self.feed.publish(Topic.CONTROL_TAMIYO_REFUSALS, refusal)
        return refusal
