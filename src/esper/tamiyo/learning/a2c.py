"""A2C trainer (advantage actor-critic), cleanrl style: one gradient step per batch of rollouts.

The update, as one readable block in :meth:`A2CTrainer.update`::

    advantages, returns = GAE(rewards, values stored at collection time)
    log-probs, entropy, values = policy.evaluate_actions(all transitions)   # current policy
    policy loss = -mean(A * log pi(a|s))
    value loss  = 0.5 * mean((V - returns)^2)                                # every value head
    loss = policy loss - ent_coef * entropy + vf_coef * value loss
    one backward, clip grad norm, optimizer step

Unlike PPO it is strictly on-policy (the policy has not changed since it collected the batch, so
there is no ratio to clip), and each batch is used once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from pydantic import Field

from esper.contracts.config_model import ConfigModel
from esper.tamiyo.learning.rollout import (
    RolloutBuffer,
    TrainablePolicy,
    clip_gradients,
    compute_gae,
    explained_variance,
)

logger = logging.getLogger(__name__)


class A2CConfig(ConfigModel):
    """A2C hyperparameters (cleanrl names).

    Raises:
        ConfigurationError: a field out of its range (every such field is named).
    """

    learning_rate: float = Field(default=7e-4, gt=0)
    gamma: float = Field(default=0.99, ge=0, le=1)
    gae_lambda: float = Field(default=1.0, ge=0, le=1)
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = Field(default=0.5, gt=0)
    norm_adv: bool = False


@dataclass(frozen=True)
class A2CLosses:
    """The terms of an A2C loss (tensors keep gradients)."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    entropy: torch.Tensor


def a2c_losses(
    *,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    returns: torch.Tensor,
    entropy: torch.Tensor,
    config: A2CConfig,
) -> A2CLosses:
    """The A2C loss of a batch.

    Args:
        log_prob: ``(B,)`` log-probs of the taken actions under the current policy.
        advantages: ``(B,)`` (no gradient flows through them).
        values: ``(B, E)`` current value estimates.
        returns: ``(B,)`` value targets.
        entropy: ``(B,)``.
        config: coefficients.
    """
    policy_loss = -(advantages.detach() * log_prob).mean()
    value_loss = 0.5 * ((values - returns.reshape(-1, 1)) ** 2).mean()
    entropy_mean = entropy.mean()
    loss = policy_loss - config.ent_coef * entropy_mean + config.vf_coef * value_loss
    return A2CLosses(loss, policy_loss, value_loss, entropy_mean)


@dataclass(frozen=True)
class A2CStats:
    """What one :meth:`A2CTrainer.update` did."""

    policy_loss: float
    value_loss: float
    entropy: float
    explained_variance: float
    grad_norm: float


class A2CTrainer:
    """Updates a policy with A2C from freshly collected rollouts.

    Args:
        policy: the policy that collected the rollouts.
        config: hyperparameters.
    """

    def __init__(self, policy: TrainablePolicy, config: A2CConfig | None = None) -> None:
        self.policy = policy
        self.config = config or A2CConfig()
        self.optimizer = torch.optim.Adam(
            policy.parameters(), lr=self.config.learning_rate, eps=1e-5
        )

    def update(self, buffer: RolloutBuffer) -> A2CStats:
        """One A2C step on ``buffer`` (collected by the current policy; complete episodes)."""
        cfg = self.config
        data = buffer.tensors()
        advantages, returns = compute_gae(
            data["rewards"],
            data["values"],
            data["dones"],
            gamma=cfg.gamma,
            gae_lambda=cfg.gae_lambda,
        )
        if cfg.norm_adv and len(buffer) > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        evaluation = self.policy.evaluate_actions(buffer.graphs, data["actions"])
        losses = a2c_losses(
            log_prob=evaluation.log_prob,
            advantages=advantages,
            values=evaluation.values,
            returns=returns,
            entropy=evaluation.entropy,
            config=cfg,
        )
        self.optimizer.zero_grad()
        losses.loss.backward()
        grad_norm = clip_gradients(self.policy, cfg.max_grad_norm)
        self.optimizer.step()
        stats = A2CStats(
            policy_loss=float(losses.policy_loss.detach()),
            value_loss=float(losses.value_loss.detach()),
            entropy=float(losses.entropy.detach()),
            explained_variance=explained_variance(data["values"], returns),
            grad_norm=grad_norm,
        )
        logger.info(
            "a2c update: policy_loss %.4f value_loss %.4f entropy %.3f explained_variance %.3f",
            stats.policy_loss,
            stats.value_loss,
            stats.entropy,
            stats.explained_variance,
        )
        return stats
