"""Graft judgement: the verdict on one graft at the end of its evaluation window (a pure function).

:func:`judge_graft` takes what was measured around a graft (:class:`GraftEvidence`) and returns
whether to keep it and its reward (:class:`GraftVerdict`); it starts no thread, changes no model
and does no I/O, so a test calls it directly. The growth executor gathers the evidence (reads
the loss tensors, runs the validation hook, looks at the seed) and applies the verdict
(fossilize or cull, publish the report).

The verdict::

    loss-spike gate (SafetyGates.check_loss_spike: before-graft losses vs the window's)
    keep = the gate allows it and the seed is still ACTIVE
    reward = compute_reward(...)      (esper.tamiyo.reward: seven components, weighted)
    rolled back by the gate ─► also a DecisionRefusal (gate ``loss_spike``, action FOSSILIZE)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from esper.contracts import AdaptationAction, AdaptationDecision, DecisionRefusal, RewardReport
from esper.tamiyo.reward import AdaptationOutcome, RewardWeights, compute_reward
from esper.tamiyo.safety import GATE_LOSS_SPIKE, SafetyConfig, SafetyGates


@dataclass(frozen=True)
class GraftEvidence:
    """What is known about one graft when its evaluation window ends.

    Attributes:
        decision: the GERMINATE decision that grafted it.
        step: the step the window ended at.
        losses_before: training losses of the steps before the graft (the baseline).
        losses_after: training losses of the evaluation window.
        metrics_before: the validation hook's ``loss`` (and ``accuracy``) at graft time
            (empty without a hook).
        metrics_after: the same at the end of the window.
        step_times_before: wall times of the steps before the graft (empty: not measured).
        step_times_after: wall times of the window's steps.
        kernel_parameters: parameters of the grafted kernel.
        base_parameters: parameters of the host model.
        faults: kernel faults of the seed.
        still_active: whether the seed is still ACTIVE (a fault may have taken it out).
    """

    decision: AdaptationDecision
    step: int
    losses_before: Sequence[float]
    losses_after: Sequence[float]
    kernel_parameters: int
    base_parameters: int
    metrics_before: Mapping[str, float] = field(default_factory=dict)
    metrics_after: Mapping[str, float] = field(default_factory=dict)
    step_times_before: Sequence[float] = ()
    step_times_after: Sequence[float] = ()
    faults: int = 0
    still_active: bool = True


@dataclass(frozen=True)
class GraftVerdict:
    """Keep or cull, and why.

    Attributes:
        keep: fossilize the graft (else cull it).
        report: its reward (``outcome`` FOSSILIZE when kept, CULL otherwise).
        rollback: when the loss-spike gate culled it, the refusal to publish.
    """

    keep: bool
    report: RewardReport
    rollback: DecisionRefusal | None = None


def judge_graft(
    evidence: GraftEvidence,
    *,
    safety: SafetyConfig,
    weights: RewardWeights | None = None,
) -> GraftVerdict:
    """The verdict on a graft (pure: evidence and thresholds in, verdict out).

    Validation loss and accuracy come from the validation hook's metrics (keys ``loss`` and
    ``accuracy``); without them, the mean finite training losses of the two windows stand in
    for the validation losses and accuracy is not measured. Step times are the medians of
    each window.

    Args:
        evidence: what was measured.
        safety: the run's thresholds (``loss_spike_tolerance``).
        weights: reward weights (default :class:`RewardWeights`).
    """
    before, after = list(evidence.losses_before), list(evidence.losses_after)
    gate = SafetyGates(safety).check_loss_spike(before, after)
    keep = gate.allowed and evidence.still_active
    decision = evidence.decision
    loss_before = evidence.metrics_before.get("loss", _mean_finite(before))
    loss_after = evidence.metrics_after.get("loss", _mean_finite(after))
    if loss_before is None or not math.isfinite(loss_before):
        # nothing measured before the graft: no change is claimed (never a crash on a NaN)
        finite_after = loss_after is not None and math.isfinite(loss_after)
        loss_before = loss_after if loss_after is not None and finite_after else 0.0
    outcome = AdaptationOutcome(
        val_loss_before=loss_before,
        val_loss_after=loss_after if loss_after is not None else math.inf,
        base_parameters=max(1, evidence.base_parameters),
        added_parameters=evidence.kernel_parameters if keep else 0,
        accuracy_before=evidence.metrics_before.get("accuracy"),
        accuracy_after=evidence.metrics_after.get("accuracy"),
        step_time_before=_median(evidence.step_times_before),
        step_time_after=_median(evidence.step_times_after),
        train_losses_before=before,
        train_losses_after=after,
        faults=evidence.faults,
        rolled_back=not keep,
    )
    report = compute_reward(outcome, weights or RewardWeights()).to_report(
        run_id=decision.run_id,
        decision_id=decision.decision_id,
        layer_name=decision.layer_name,
        step=evidence.step,
        outcome=AdaptationAction.FOSSILIZE if keep else AdaptationAction.CULL,
    )
    rollback = None
    if not gate.allowed:
        rollback = DecisionRefusal(
            run_id=decision.run_id,
            decision_id=decision.decision_id,
            step=evidence.step,
            layer_name=decision.layer_name,
            action=AdaptationAction.FOSSILIZE,
            gate=GATE_LOSS_SPIKE,
            reason=f"graft of decision {decision.decision_id} rolled back: {gate.reason}",
            policy=decision.policy,
        )
    return GraftVerdict(keep=keep, report=report, rollback=rollback)


def _mean_finite(values: Sequence[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _median(values: Sequence[float]) -> float:
    """Median of ``values`` (0 when empty: not measured)."""
    return float(statistics.median(values)) if values else 0.0
