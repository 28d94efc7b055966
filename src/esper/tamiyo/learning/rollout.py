"""Rollout storage and advantage estimation shared by the PPO and A2C trainers.

A :class:`RolloutBuffer` holds what was *collected*: each observation, the action taken, the
log-probability and value the acting policy gave it **at collection time** (never recomputed
from an updated policy), the reward and whether the episode ended there. :func:`compute_gae`
turns rewards and values into generalized advantage estimates and value targets.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from esper.tamiyo.observation import ActionEvaluation, LayerGraph, PolicyOutput


class TrainablePolicy(Protocol):
    """A policy a trainer can update: an ``nn.Module`` that re-evaluates stored actions."""

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """The module's parameters (``nn.Module.parameters``)."""
        ...

    def evaluate_actions(
        self, graphs: Sequence[LayerGraph], actions: torch.Tensor
    ) -> ActionEvaluation:
        """Log-probs, entropies and values of ``actions`` (``(B,)`` int64) in ``graphs``."""
        ...


@dataclass
class Transition:
    """One decision: what was seen, chosen, and estimated when it was made, and what followed."""

    graph: LayerGraph
    action: int
    log_prob: float
    value: float
    reward: float = 0.0
    done: bool = False

    @classmethod
    def from_output(cls, graph: LayerGraph, output: PolicyOutput) -> Transition:
        """Record a policy decision (reward and ``done`` are filled in when known)."""
        return cls(graph, output.action.index(), output.log_prob, output.value)


@dataclass
class RolloutBuffer:
    """Transitions in collection order (episodes back to back, each ending with ``done``)."""

    transitions: list[Transition] = field(default_factory=list)

    def extend(self, transitions: Sequence[Transition]) -> None:
        """Append one episode's (or several episodes') transitions."""
        self.transitions.extend(transitions)

    def clear(self) -> None:
        """Drop everything (after an update)."""
        self.transitions.clear()

    def __len__(self) -> int:
        return len(self.transitions)

    @property
    def graphs(self) -> list[LayerGraph]:
        """Observations, in order."""
        return [t.graph for t in self.transitions]

    def tensors(self) -> dict[str, torch.Tensor]:
        """``actions`` (T,) int64 and ``log_probs``, ``values``, ``rewards``, ``dones`` (T,)."""
        ts = self.transitions
        return {
            "actions": torch.tensor([t.action for t in ts], dtype=torch.int64),
            "log_probs": torch.tensor([t.log_prob for t in ts], dtype=torch.float32),
            "values": torch.tensor([t.value for t in ts], dtype=torch.float32),
            "rewards": torch.tensor([t.reward for t in ts], dtype=torch.float32),
            "dones": torch.tensor([t.done for t in ts], dtype=torch.float32),
        }


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    *,
    last_value: float = 0.0,
    gamma: float = 0.99,
    gae_lambda: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over a sequence of transitions.

    ``dones[t] = 1`` means the episode ended after transition ``t`` (no bootstrap past it)::

        delta_t = r_t + gamma * V_{t+1} * (1 - done_t) - V_t
        A_t     = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}

    with ``V_T = last_value`` (the value after the last transition, if its episode goes on).

    Args:
        rewards: ``(T,)``.
        values: ``(T,)`` values the acting policy estimated at collection time.
        dones: ``(T,)`` 0/1.
        last_value: bootstrap value after the final transition.
        gamma: discount.
        gae_lambda: GAE lambda (1: Monte Carlo advantages, 0: one-step TD errors).

    Returns:
        ``advantages (T,)`` and ``returns (T,) = advantages + values`` (the value targets).
    """
    steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    next_advantage = 0.0
    next_value = last_value
    for t in reversed(range(steps)):
        not_done = 1.0 - float(dones[t])
        delta = float(rewards[t]) + gamma * next_value * not_done - float(values[t])
        next_advantage = delta + gamma * gae_lambda * not_done * next_advantage
        advantages[t] = next_advantage
        next_value = float(values[t])
    return advantages, advantages + values


def explained_variance(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """``1 - Var(target - predicted) / Var(target)``: 1 is perfect, 0 no better than a constant,
    negative worse; NaN when the target is constant."""
    var_target = torch.var(target, unbiased=False)
    if float(var_target) == 0.0:
        return float("nan")
    return float(1.0 - torch.var(target - predicted, unbiased=False) / var_target)


def clip_gradients(module: TrainablePolicy, max_norm: float) -> float:
    """Clip the global gradient norm of ``module``'s parameters; returns the norm before."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
