"""PPO trainer (clipped surrogate, GAE, value loss, entropy bonus, minibatch epochs), cleanrl style.

One update, as one readable block in :meth:`PPOTrainer.update`::

    advantages, returns = GAE(rewards, values stored at collection time)
    for epoch in range(update_epochs):
        for minibatch in shuffled(buffer):
            new log-probs, entropy, values = policy.evaluate_actions(minibatch)
            ratio = exp(new_log_prob - old_log_prob)          # old: stored when collected
            policy loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))
            value loss  = 0.5 * mean((V - returns)^2)          # every value head
            loss = policy loss - ent_coef * entropy + vf_coef * value loss
            one backward, clip grad norm, optimizer step
        stop early if approx_kl > target_kl

Logged per update: ``approx_kl`` (the ``(r - 1) - log r`` estimator), ``clipfrac``,
``explained_variance``, the three losses and the entropy.
"""

from __future__ import annotations

import logging
import math
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


class PPOConfig(ConfigModel):
    """PPO hyperparameters (cleanrl names).

    Raises:
        ConfigurationError: a field out of its range (every such field is named).
    """

    learning_rate: float = Field(default=3e-4, gt=0)
    gamma: float = Field(default=0.99, ge=0, le=1)
    gae_lambda: float = Field(default=0.95, ge=0, le=1)
    clip_coef: float = Field(default=0.2, gt=0, lt=1)
    clip_value_loss: bool = False
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    update_epochs: int = Field(default=4, ge=1)
    minibatch_size: int = Field(default=32, ge=1)
    max_grad_norm: float = Field(default=0.5, gt=0)
    norm_adv: bool = True
    target_kl: float | None = Field(default=None, gt=0)
    seed: int = 0
    """Seed of the minibatch shuffling."""


@dataclass(frozen=True)
class PPOLosses:
    """The terms of one minibatch's PPO loss and its diagnostics (tensors keep gradients)."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    entropy: torch.Tensor
    ratio: torch.Tensor
    approx_kl: float
    clipfrac: float


def ppo_losses(
    *,
    new_log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    entropy: torch.Tensor,
    config: PPOConfig,
) -> PPOLosses:
    """The PPO loss of one minibatch (advantages already normalised if wanted).

    Args:
        new_log_prob: ``(B,)`` log-probs of the stored actions under the current policy.
        old_log_prob: ``(B,)`` log-probs stored when the actions were taken.
        advantages: ``(B,)``.
        new_values: ``(B, E)`` current value estimates (E value heads; E = 1 is fine).
        old_values: ``(B,)`` values stored at collection time (for value clipping).
        returns: ``(B,)`` value targets.
        entropy: ``(B,)`` entropies of the current action distributions.
        config: coefficients.
    """
    log_ratio = new_log_prob - old_log_prob
    ratio = log_ratio.exp()
    with torch.no_grad():
        approx_kl = float(((ratio - 1) - log_ratio).mean())
        clipfrac = float(((ratio - 1.0).abs() > config.clip_coef).float().mean())
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - config.clip_coef, 1 + config.clip_coef)
    policy_loss = torch.max(unclipped, clipped).mean()

    target = returns.reshape(-1, 1)  # (B, 1), broadcast over value heads
    if config.clip_value_loss:
        old = old_values.reshape(-1, 1)
        values_clipped = old + torch.clamp(new_values - old, -config.clip_coef, config.clip_coef)
        value_loss = 0.5 * torch.max((new_values - target) ** 2, (values_clipped - target) ** 2)
        value_loss = value_loss.mean()
    else:
        value_loss = 0.5 * ((new_values - target) ** 2).mean()
    entropy_mean = entropy.mean()
    loss = policy_loss - config.ent_coef * entropy_mean + config.vf_coef * value_loss
    return PPOLosses(loss, policy_loss, value_loss, entropy_mean, ratio, approx_kl, clipfrac)


@dataclass(frozen=True)
class PPOStats:
    """What one :meth:`PPOTrainer.update` did (means over its minibatches)."""

    policy_loss: float
    value_loss: float
    entropy: float
    approx_kl: float
    clipfrac: float
    explained_variance: float
    minibatches: int
    epochs: int


class PPOTrainer:
    """Updates a policy with PPO from collected rollouts.

    Args:
        policy: the policy that collected the rollouts (a module with ``evaluate_actions``).
        config: hyperparameters.
    """

    def __init__(self, policy: TrainablePolicy, config: PPOConfig | None = None) -> None:
        self.policy = policy
        self.config = config or PPOConfig()
        self.optimizer = torch.optim.Adam(
            policy.parameters(), lr=self.config.learning_rate, eps=1e-5
        )
        self._shuffle = torch.Generator().manual_seed(self.config.seed)

    def update(self, buffer: RolloutBuffer) -> PPOStats:
        """One PPO update on ``buffer`` (episodes must be complete: the last ``done`` is set)."""
        cfg = self.config
        data = buffer.tensors()
        graphs = buffer.graphs
        advantages, returns = compute_gae(
            data["rewards"],
            data["values"],
            data["dones"],
            gamma=cfg.gamma,
            gae_lambda=cfg.gae_lambda,
        )
        n = len(buffer)
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "approx_kl": 0.0}
        sums["clipfrac"] = 0.0
        minibatches = 0
        epochs_done = 0
        for _epoch in range(cfg.update_epochs):
            epochs_done += 1
            order = torch.randperm(n, generator=self._shuffle)
            epoch_kl = []
            for start in range(0, n, cfg.minibatch_size):
                idx = order[start : start + cfg.minibatch_size]
                mb_adv = advantages[idx]
                if cfg.norm_adv and len(idx) > 1:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                evaluation = self.policy.evaluate_actions(
                    [graphs[i] for i in idx.tolist()], data["actions"][idx]
                )
                losses = ppo_losses(
                    new_log_prob=evaluation.log_prob,
                    old_log_prob=data["log_probs"][idx],
                    advantages=mb_adv,
                    new_values=evaluation.values,
                    old_values=data["values"][idx],
                    returns=returns[idx],
                    entropy=evaluation.entropy,
                    config=cfg,
                )
                self.optimizer.zero_grad()
                losses.loss.backward()
                clip_gradients(self.policy, cfg.max_grad_norm)
                self.optimizer.step()
                minibatches += 1
                epoch_kl.append(losses.approx_kl)
                sums["policy_loss"] += float(losses.policy_loss.detach())
                sums["value_loss"] += float(losses.value_loss.detach())
                sums["entropy"] += float(losses.entropy.detach())
                sums["approx_kl"] += losses.approx_kl
                sums["clipfrac"] += losses.clipfrac
            if cfg.target_kl is not None and sum(epoch_kl) / len(epoch_kl) > cfg.target_kl:
                break
        stats = PPOStats(
            policy_loss=sums["policy_loss"] / max(minibatches, 1),
            value_loss=sums["value_loss"] / max(minibatches, 1),
            entropy=sums["entropy"] / max(minibatches, 1),
            approx_kl=sums["approx_kl"] / max(minibatches, 1),
            clipfrac=sums["clipfrac"] / max(minibatches, 1),
            explained_variance=explained_variance(data["values"], returns),
            minibatches=minibatches,
            epochs=epochs_done,
        )
        logger.info(
            "ppo update: policy_loss %.4f value_loss %.4f entropy %.3f approx_kl %.4f "
            "clipfrac %.3f explained_variance %s",
            stats.policy_loss,
            stats.value_loss,
            stats.entropy,
            stats.approx_kl,
            stats.clipfrac,
            "nan" if math.isnan(stats.explained_variance) else f"{stats.explained_variance:.3f}",
        )
        return stats
