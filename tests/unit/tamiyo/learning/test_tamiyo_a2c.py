"""A2C: loss terms against a hand computation, one step per batch with Monte Carlo advantages,
and the trainer learns a bandit."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import nn

from esper.tamiyo.learning.a2c import A2CConfig, A2CTrainer, a2c_losses
from esper.tamiyo.learning.rollout import ActionEvaluation, RolloutBuffer, Transition
from esper.tamiyo.observation import (
    BLUEPRINT_CATALOG,
    GLOBAL_FEATURES,
    NODE_FEATURES,
    GrowthAction,
    LayerGraph,
)
from esper.tamiyo.policy import GNNPolicy, GNNPolicyConfig

K = len(BLUEPRINT_CATALOG)


def graph(
    n: int = 1, *, marked: int | None = None, generator: torch.Generator | None = None
) -> LayerGraph:
    """A chain of ``n`` layers; with ``marked``, random health in which the marked layer has the
    largest output_std (by a margin of 1)."""
    x = torch.zeros((n, len(NODE_FEATURES)))
    if marked is not None:
        x[:, :6] = torch.randn((n, 6), generator=generator)
        std = NODE_FEATURES.index("output_std")
        x[marked, std] = x[:, std].max() + 1.0
    mask = torch.zeros((n, K), dtype=torch.bool)
    mask[:, 1] = True
    return LayerGraph(
        layer_names=tuple(f"l{i}" for i in range(n)),
        node_features=x,
        edge_index=torch.tensor([list(range(n - 1)), list(range(1, n))], dtype=torch.int64),
        germinate_mask=mask,
        global_features=torch.zeros(len(GLOBAL_FEATURES)),
        step=0,
    )


class TabularPolicy(nn.Module):
    """One set of logits for every observation, and one value."""

    def __init__(self, actions: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(actions))
        self.value = nn.Parameter(torch.zeros(()))
        self.backward_calls = 0
        self.logits.register_hook(self._count)

    def _count(self, grad: torch.Tensor) -> None:
        self.backward_calls += 1

    def evaluate_actions(
        self, graphs: Sequence[LayerGraph], actions: torch.Tensor
    ) -> ActionEvaluation:
        logp = torch.log_softmax(self.logits, dim=0).expand(len(graphs), -1)  # (B, A)
        entropy = -(logp.exp() * logp).sum(dim=1)
        values = self.value.expand(len(graphs), 1)  # (B, 1)
        return ActionEvaluation(logp.gather(1, actions.reshape(-1, 1)).squeeze(1), entropy, values)

    def log_prob(self, action: int) -> float:
        return float(torch.log_softmax(self.logits.detach(), dim=0)[action])


def bandit_buffer(policy: TabularPolicy, actions: list[int], rewards: list[float]) -> RolloutBuffer:
    buffer = RolloutBuffer()
    for action, reward in zip(actions, rewards, strict=True):
        buffer.extend([Transition(graph(), action, policy.log_prob(action), 0.0, reward, True)])
    return buffer


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


@pytest.mark.slow
def test_a2c_teaches_the_gnn_to_find_the_marked_layer() -> None:
    """The graph bandit of the PPO tests, learned with A2C (one step per batch)."""
    torch.set_num_threads(1)
    policy = GNNPolicy(GNNPolicyConfig(hidden=32, layers=2, ensemble=3), sample_seed=0)
    trainer = A2CTrainer(policy, A2CConfig(learning_rate=3e-3, norm_adv=True, ent_coef=0.0))
    rng = torch.Generator().manual_seed(1)

    def sample(count: int) -> list[tuple[LayerGraph, int]]:
        out = []
        for _ in range(count):
            n = int(torch.randint(3, 7, (1,), generator=rng))
            marked = int(torch.randint(0, n, (1,), generator=rng))
            out.append((graph(n, marked=marked, generator=rng), marked))
        return out

    held_out = sample(50)

    def hit_rate() -> float:
        hits = [policy.act(g).action == GrowthAction(m, 1) for g, m in held_out]
        return sum(hits) / len(hits)

    before = hit_rate()
    for _ in range(120):
        buffer = RolloutBuffer()
        for g, marked in sample(32):
            output = policy.act(g, explore=True)
            transition = Transition.from_output(g, output)
            transition.reward = 1.0 if output.action == GrowthAction(marked, 1) else 0.0
            transition.done = True
            buffer.extend([transition])
        trainer.update(buffer)
    assert before < 0.5
    assert hit_rate() >= 0.9
