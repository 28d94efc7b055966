"""A2C: loss terms against a hand computation, one step per batch with Monte Carlo advantages,
and the trainer learns a bandit."""

from __future__ import annotations

import pytest
import torch

from esper.tamiyo.a2c import A2CConfig, A2CTrainer, a2c_losses
from esper.tamiyo.observation import BLUEPRINT_CATALOG
from esper.tamiyo.rollout import RolloutBuffer, Transition
from test_tamiyo_ppo import TabularPolicy, bandit_buffer, graph

K = len(BLUEPRINT_CATALOG)


def test_a2c_losses_match_hand_computation() -> None:
    log_prob = torch.log(torch.tensor([0.5, 0.25])).requires_grad_(True)
    advantages = torch.tensor([2.0, -1.0])
    losses = a2c_losses(
        log_prob=log_prob,
        advantages=advantages,
        values=torch.tensor([[1.0, 3.0], [0.0, 0.0]]),  # two value heads
        returns=torch.tensor([2.0, 1.0]),
        entropy=torch.tensor([0.5, 1.5]),
        config=A2CConfig(ent_coef=0.1, vf_coef=0.5),
    )
    # policy: -mean(A log pi) = -(2 ln 0.5 - ln 0.25) / 2 = 0 (2 ln 0.5 == ln 0.25)
    assert float(losses.policy_loss.detach()) == pytest.approx(0.0, abs=1e-7)
    # value: 0.5 * mean((1-2)^2, (3-2)^2, (0-1)^2, (0-1)^2) = 0.5
    assert float(losses.value_loss) == pytest.approx(0.5)
    assert float(losses.loss.detach()) == pytest.approx(0.0 - 0.1 * 1.0 + 0.5 * 0.5)
    losses.policy_loss.backward()
    assert log_prob.grad is not None
    assert log_prob.grad.tolist() == pytest.approx([-1.0, 0.5])  # -A / B


def test_update_takes_one_step_with_monte_carlo_returns() -> None:
    policy = TabularPolicy(1 + K)
    trainer = A2CTrainer(policy, A2CConfig(learning_rate=0.1, gamma=1.0, gae_lambda=1.0))
    buffer = RolloutBuffer()
    # one 3-decision episode: rewards 0, 0, 3 -> every decision's return is 3
    for i, reward in enumerate([0.0, 0.0, 3.0]):
        buffer.extend([Transition(graph(), i, policy.log_prob(i), 0.0, reward, i == 2)])
    stats = trainer.update(buffer)
    assert policy.backward_calls == 1
    # values are all 0: value loss = 0.5 * 3^2, explained variance of a constant target: NaN
    assert stats.value_loss == pytest.approx(4.5)
    assert stats.grad_norm > 0
    assert float(policy.value) > 0  # moved towards the return


def test_a2c_learns_a_two_armed_bandit() -> None:
    policy = TabularPolicy(1 + K)
    trainer = A2CTrainer(policy, A2CConfig(learning_rate=0.05, norm_adv=True))
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        probs = torch.softmax(policy.logits.detach(), dim=0)
        actions = torch.multinomial(probs, 16, replacement=True, generator=generator).tolist()
        rewards = [1.0 if a == 3 else 0.0 for a in actions]
        trainer.update(bandit_buffer(policy, actions, rewards))
    assert float(torch.softmax(policy.logits.detach(), dim=0)[3]) > 0.9
