"""PPO: GAE, ratios, clipping and losses against hand computations; old log-probs come from
collection time; one backward per minibatch; the trainer learns a bandit and a graph task."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from esper.tamiyo.learning.ppo import PPOConfig, PPOTrainer, ppo_losses
from esper.tamiyo.learning.rollout import (
    ActionEvaluation,
    RolloutBuffer,
    Transition,
    compute_gae,
    explained_variance,
)
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
    n: int = 1,
    *,
    marked: int | None = None,
    generator: torch.Generator | None = None,
) -> LayerGraph:
    """A chain of ``n`` layers; with ``marked``, random health features in which the marked
    layer has the largest output_std (by a margin of 1)."""
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
    """One set of logits for every observation, and one value: the smallest trainable policy."""

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


def test_gae_matches_hand_computation() -> None:
    rewards = torch.tensor([1.0, 0.0, 2.0])
    values = torch.tensor([0.5, 0.4, 0.3])
    dones = torch.tensor([0.0, 0.0, 1.0])
    advantages, returns = compute_gae(rewards, values, dones, gamma=0.9, gae_lambda=0.8)
    # t=2: 2 - 0.3 = 1.7
    # t=1: delta = 0 + 0.9*0.3 - 0.4 = -0.13;  A = -0.13 + 0.72 * 1.7 = 1.094
    # t=0: delta = 1 + 0.9*0.4 - 0.5 = 0.86;   A = 0.86 + 0.72 * 1.094 = 1.64768
    assert advantages.tolist() == pytest.approx([1.64768, 1.094, 1.7])
    assert returns.tolist() == pytest.approx([2.14768, 1.494, 2.0])


def test_gae_stops_at_episode_ends_and_bootstraps_an_unfinished_one() -> None:
    rewards = torch.tensor([1.0, 1.0])
    values = torch.tensor([0.5, 0.5])
    dones = torch.tensor([1.0, 0.0])
    advantages, _ = compute_gae(rewards, values, dones, last_value=2.0, gamma=0.5, gae_lambda=1.0)
    # t=1: 1 + 0.5 * 2.0 - 0.5 = 1.5 (bootstrapped);  t=0: 1 - 0.5 = 0.5 (episode ended there)
    assert advantages.tolist() == pytest.approx([0.5, 1.5])
    td, _ = compute_gae(
        torch.tensor([0.0, 1.0]), torch.tensor([0.2, 0.6]), torch.tensor([0.0, 1.0]),
        gamma=1.0, gae_lambda=0.0,
    )  # fmt: skip
    assert td.tolist() == pytest.approx([0.6 - 0.2, 1.0 - 0.6])  # lambda 0: one-step TD errors


def test_ppo_ratio_clipping_losses_and_diagnostics_match_hand_computation() -> None:
    old = torch.log(torch.tensor([0.2, 0.4, 0.5]))
    new = (old + torch.log(torch.tensor([1.5, 0.5, 1.1]))).requires_grad_(True)
    config = PPOConfig(clip_coef=0.2, ent_coef=0.01, vf_coef=0.5)
    losses = ppo_losses(
        new_log_prob=new,
        old_log_prob=old,
        advantages=torch.tensor([1.0, 1.0, -1.0]),
        new_values=torch.tensor([[1.0], [2.0], [0.0]]),
        old_values=torch.zeros(3),
        returns=torch.tensor([1.5, 1.0, 0.5]),
        entropy=torch.tensor([1.0, 2.0, 3.0]),
        config=config,
    )
    assert losses.ratio.tolist() == pytest.approx([1.5, 0.5, 1.1])
    # per sample max(-A r, -A clip(r)): [max(-1.5, -1.2), max(-0.5, -0.8), max(1.1, 1.1)]
    assert float(losses.policy_loss.detach()) == pytest.approx((-1.2 - 0.5 + 1.1) / 3)
    assert losses.clipfrac == pytest.approx(2 / 3)
    kl = [0.5 - math.log(1.5), -0.5 - math.log(0.5), 0.1 - math.log(1.1)]
    assert losses.approx_kl == pytest.approx(sum(kl) / 3)
    assert float(losses.value_loss) == pytest.approx(0.5 * (0.25 + 1.0 + 0.25) / 3)
    assert float(losses.entropy) == pytest.approx(2.0)
    assert float(losses.loss) == pytest.approx(-0.2 - 0.01 * 2.0 + 0.5 * 0.25)
    losses.policy_loss.backward()
    # clipped sample: no gradient; the others: d(-A r)/d log pi = -A r, averaged over 3
    assert new.grad is not None
    assert new.grad.tolist() == pytest.approx([0.0, -0.5 / 3, 1.1 / 3])


def test_value_clipping_takes_the_pessimistic_error() -> None:
    losses = ppo_losses(
        new_log_prob=torch.zeros(2),
        old_log_prob=torch.zeros(2),
        advantages=torch.zeros(2),
        new_values=torch.tensor([[1.0], [0.5]]),
        old_values=torch.tensor([0.0, 0.4]),
        returns=torch.tensor([1.0, 0.0]),
        entropy=torch.zeros(2),
        config=PPOConfig(clip_coef=0.2, clip_value_loss=True),
    )
    # sample 0: unclipped error 0, clipped value 0.2 -> error 0.64 (the larger one counts);
    # sample 1: 0.5 is within 0.2 of 0.4, so both errors are 0.25
    assert float(losses.value_loss) == pytest.approx(0.5 * (0.64 + 0.25) / 2)


def test_explained_variance() -> None:
    target = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(target, target) == pytest.approx(1.0)
    assert explained_variance(torch.full((4,), 2.5), target) == pytest.approx(0.0)
    assert math.isnan(explained_variance(target, torch.ones(4)))


def bandit_buffer(policy: TabularPolicy, actions: list[int], rewards: list[float]) -> RolloutBuffer:
    buffer = RolloutBuffer()
    for action, reward in zip(actions, rewards, strict=True):
        transition = Transition(graph(), action, policy.log_prob(action), 0.0, reward, True)
        buffer.extend([transition])
    return buffer


def test_update_uses_log_probs_stored_at_collection_time() -> None:
    policy = TabularPolicy(1 + K)
    trainer = PPOTrainer(policy, PPOConfig(update_epochs=1, minibatch_size=4, norm_adv=False))
    fresh = bandit_buffer(policy, [0, 2, 0, 2], [0.0, 1.0, 0.0, 1.0])
    stats = trainer.update(fresh)
    assert stats.approx_kl == pytest.approx(0.0, abs=1e-7)  # first minibatch: ratio exactly 1
    assert stats.clipfrac == 0.0

    # the same transitions, but their stored log-probs say the actions were much less likely
    stale = bandit_buffer(policy, [0, 2, 0, 2], [0.0, 1.0, 0.0, 1.0])
    for t in stale.transitions:
        t.log_prob -= 1.0
    stats = trainer.update(stale)
    assert stats.clipfrac == 1.0  # ratio e^1 for every sample: clipped
    assert stats.approx_kl == pytest.approx(math.e - 1 - 1, rel=1e-3)


def test_one_backward_per_minibatch() -> None:
    policy = TabularPolicy(1 + K)
    trainer = PPOTrainer(policy, PPOConfig(update_epochs=3, minibatch_size=4))
    buffer = bandit_buffer(policy, [0, 1, 2, 3, 4, 1, 2, 3, 4, 0], [float(i) for i in range(10)])
    stats = trainer.update(buffer)
    assert stats.minibatches == 3 * 3  # ceil(10 / 4) per epoch
    assert policy.backward_calls == stats.minibatches


def test_ppo_learns_a_two_armed_bandit() -> None:
    torch.manual_seed(0)
    policy = TabularPolicy(1 + K)
    trainer = PPOTrainer(policy, PPOConfig(learning_rate=0.05, update_epochs=4, minibatch_size=8))
    generator = torch.Generator().manual_seed(0)
    for _ in range(15):
        probs = torch.softmax(policy.logits.detach(), dim=0)
        actions = torch.multinomial(probs, 16, replacement=True, generator=generator).tolist()
        rewards = [1.0 if a == 2 else 0.0 for a in actions]
        trainer.update(bandit_buffer(policy, actions, rewards))
    assert float(torch.softmax(policy.logits.detach(), dim=0)[2]) > 0.9


def test_ppo_teaches_the_gnn_to_find_the_marked_layer() -> None:
    """Contextual bandit on graphs of 3-6 layers with random health: reward 1 for germinating
    the layer whose output_std is largest."""
    torch.manual_seed(0)
    policy = GNNPolicy(GNNPolicyConfig(hidden=32, layers=2, ensemble=3), sample_seed=0)
    trainer = PPOTrainer(
        policy, PPOConfig(learning_rate=3e-3, update_epochs=4, minibatch_size=16, ent_coef=0.0)
    )
    rng = torch.Generator().manual_seed(1)

    def sample_graphs(count: int) -> list[tuple[LayerGraph, int]]:
        out = []
        for _ in range(count):
            n = int(torch.randint(3, 7, (1,), generator=rng))
            marked = int(torch.randint(0, n, (1,), generator=rng))
            out.append((graph(n, marked=marked, generator=rng), marked))
        return out

    def hit_rate(pairs: list[tuple[LayerGraph, int]]) -> float:
        return sum(policy.act(g).action == GrowthAction(m, 1) for g, m in pairs) / len(pairs)

    held_out = sample_graphs(50)
    before = hit_rate(held_out)
    for _ in range(25):
        buffer = RolloutBuffer()
        for g, marked in sample_graphs(32):
            output = policy.act(g, explore=True)
            reward = 1.0 if output.action == GrowthAction(marked, 1) else 0.0
            transition = Transition.from_output(g, output)
            transition.reward, transition.done = reward, True
            buffer.extend([transition])
        trainer.update(buffer)
    after = hit_rate(held_out)
    assert before < 0.5
    assert after >= 0.9
