"""Proof that the policy learns: the shipped GNN policy finds the bottleneck layer of held-out
synthetic tasks, beats the random and round-robin baselines at equal parameter budget, and is
reproduced by retraining with the same seed.

The shipped policy (``esper/tamiyo/pretrained/bottleneck_gnn.safetensors``) was produced by
``python -m esper.tamiyo.learning.policy_training`` (PPO on :class:`BottleneckTask` growth episodes); its
JSON record next to it says how it was trained and what it scored.
"""

from __future__ import annotations

import json

import pytest
import torch

from esper.tamiyo.baselines import RandomPolicy, RoundRobinPolicy
from esper.tamiyo.learning.episodes import EpisodeConfig
from esper.tamiyo.learning.growth_tasks import BottleneckTask
from esper.tamiyo.learning.policy_training import (
    HELD_OUT_SEEDS,
    PRETRAINED_DIR,
    PRETRAINED_NAME,
    PolicyTrainingConfig,
    evaluate_policy,
    reward_correlations,
    train_policy,
)
from esper.tamiyo.policy import GNNPolicy, load_gnn_policy

WEIGHTS = PRETRAINED_DIR / f"{PRETRAINED_NAME}.safetensors"
RECORD = PRETRAINED_DIR / f"{PRETRAINED_NAME}.json"


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shipped() -> GNNPolicy:
    return load_gnn_policy(WEIGHTS)


def test_shipped_policy_finds_the_bottleneck_in_held_out_episodes(shipped: GNNPolicy) -> None:
    seeds = list(HELD_OUT_SEEDS[100:140])  # not even the seeds its record was scored on
    summary = evaluate_policy(
        BottleneckTask(), shipped, seeds, episode=EpisodeConfig(steps_after=0)
    )
    assert summary.germination_rate == 1.0
    assert summary.hit_rate is not None
    assert summary.hit_rate >= 0.9  # random: 1 in 5 (4 branches and the head)


def test_shipped_policy_record_matches_the_weights(shipped: GNNPolicy) -> None:
    record = json.loads(RECORD.read_text())
    assert record["held_out"]["hit_rate"] >= 0.9
    assert record["config"]["seed"] == 0
    assert record["config"]["policy"] == {
        "hidden": shipped.config.hidden,
        "attention_heads": shipped.config.attention_heads,
        "layers": shipped.config.layers,
        "ensemble": shipped.config.ensemble,
        "relative_health": shipped.config.relative_health,
        "init_seed": shipped.config.init_seed,
    }


@pytest.mark.slow
def test_shipped_policy_beats_random_and_round_robin_on_final_loss(shipped: GNNPolicy) -> None:
    """Full episodes, each policy grafting one ``mlp_h32`` kernel (equal parameter budget)."""
    task = BottleneckTask()
    seeds = list(HELD_OUT_SEEDS[:24])
    gnn = evaluate_policy(task, shipped, seeds)
    rand = evaluate_policy(task, RandomPolicy(seed=0), seeds)
    robin = evaluate_policy(task, RoundRobinPolicy(), seeds)
    for summary in (gnn, rand, robin):
        assert summary.germination_rate == 1.0
    assert gnn.mean_added_parameters <= rand.mean_added_parameters + 1e-9
    assert gnn.hit_rate is not None and rand.hit_rate is not None
    assert gnn.hit_rate >= 0.9 and rand.hit_rate <= 0.5
    assert gnn.mean_val_loss < 0.8 * rand.mean_val_loss
    assert gnn.mean_val_loss < 0.8 * robin.mean_val_loss

    # the reward's loss term tracks the outcome that matters across all these episodes
    correlations = reward_correlations(gnn.results + rand.results + robin.results)
    loss_term = correlations["loss_improvement"]
    assert loss_term.samples == 3 * len(seeds)
    assert loss_term.spearman is not None and loss_term.spearman < -0.3


@pytest.mark.slow
def test_retraining_with_the_same_seed_reproduces_the_shipped_policy(shipped: GNNPolicy) -> None:
    """Deterministic on one torch build and CPU: same config and seed give the same weights."""
    record = json.loads(RECORD.read_text())
    config = PolicyTrainingConfig(iterations=record["config"]["iterations"])
    result = train_policy(BottleneckTask(), config)
    retrained = result.policy.state_dict()
    for name, tensor in shipped.state_dict().items():
        assert torch.equal(retrained[name], tensor), f"{name} differs after retraining"
    assert [log.mean_reward for log in result.history] == pytest.approx(
        [log["mean_reward"] for log in record["history"]]
    )
