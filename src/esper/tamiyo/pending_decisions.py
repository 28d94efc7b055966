"""Pending decisions: the germinations a controller published that the training side has not
settled yet.

A published germination *commits* its kernel's parameters: they count against the parameter
budget until a :class:`~esper.contracts.RewardReport` says the graft was culled, or the training
side refuses the decision (a :class:`~esper.contracts.DecisionRefusal` naming its id). It also
*reserves* its seed: the seed stays DORMANT until the training side has the kernel, and until it
is seen in use (in the model, or in telemetry newer than the decision) it counts as taken, so two
decisions never target one seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from esper.contracts import AdaptationDecision, SeedState


class PendingDecisions:
    """Committed parameters and reserved seeds of published decisions, by decision id."""

    def __init__(self) -> None:
        self._committed: dict[str, tuple[str, int, int]] = {}
        """decision id -> (layer name, step, added parameters); released when culled or refused."""
        self._reserved: dict[str, tuple[str, int, int]] = {}
        """decision id -> (layer name, seed index, step); released once the seed is seen in use."""

    def add(self, decision: AdaptationDecision, *, added_parameters: int) -> None:
        """A germination was published: commit its parameters and reserve its seed."""
        layer, step = decision.layer_name, decision.step
        self._committed[decision.decision_id] = (layer, step, added_parameters)
        self._reserved[decision.decision_id] = (layer, decision.seed_idx, step)

    def rewarded(self, decision_id: str, *, culled: bool) -> None:
        """The decision's graft was evaluated: its seed is settled; a culled graft's parameters
        leave the budget (a kept one's stay, now as the model's)."""
        self._reserved.pop(decision_id, None)
        if culled:
            self._committed.pop(decision_id, None)

    def refused(self, decision_id: str) -> bool:
        """The training side could not apply the decision: its parameters never arrive. Returns
        whether the decision was pending."""
        if decision_id not in self._committed:
            return False
        del self._committed[decision_id]
        self._reserved.pop(decision_id, None)
        return True

    def committed_parameters(self) -> int:
        """Parameters of every committed decision."""
        return sum(params for _, _, params in self._committed.values())

    def with_reserved_seeds(
        self,
        states: dict[str, tuple[SeedState, ...]],
        seen_at: Mapping[str, int] | None,
    ) -> dict[str, tuple[SeedState, ...]]:
        """``states`` with each reserved seed that is still DORMANT counted as LOADING.

        Args:
            states: every seed's state by layer name (updated in place and returned).
            seen_at: the step of each layer's newest telemetry (``None``: ``states`` come from
                the model itself, so a seed in use there is in use). A reservation whose seed
                is seen in use at a newer step is released.
        """
        for decision_id, (layer, seed_idx, step) in list(self._reserved.items()):
            current = list(states.get(layer, ()))
            if seed_idx >= len(current):
                continue
            fresh = seen_at is None or seen_at.get(layer, -1) > step
            if current[seed_idx] is not SeedState.DORMANT and fresh:
                del self._reserved[decision_id]  # applied: telemetry shows it from now on
            elif current[seed_idx] is SeedState.DORMANT:
                current[seed_idx] = SeedState.LOADING
                states[layer] = tuple(current)
        return states

    def state_dict(self) -> dict[str, Any]:
        """``committed`` and ``reserved`` as JSON-able lists, by decision id."""
        return {
            "committed": {k: list(v) for k, v in self._committed.items()},
            "reserved": {k: list(v) for k, v in self._reserved.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._committed = {
            k: (str(v[0]), int(v[1]), int(v[2])) for k, v in state["committed"].items()
        }
        self._reserved = {
            k: (str(v[0]), int(v[1]), int(v[2])) for k, v in state["reserved"].items()
        }
