"""Growth episodes and tasks: grafts go through Kasmina, the mask follows the config and budget,
rewards are the seven-component ones, episodes are reproducible, and the synthetic task has the
properties it claims (a kernel at the bottleneck helps most; the health features show where)."""

from __future__ import annotations

import math

import pytest
import torch

from esper.errors import ConfigurationError
from esper.tamiyo.baselines import RandomPolicy
from esper.tamiyo.learning.episodes import EpisodeConfig, run_episode
from esper.tamiyo.learning.growth_tasks import BottleneckTask, DigitsTask, MNIST1DTask
from esper.tamiyo.observation import (
    BLUEPRINT_CATALOG,
    NODE_FEATURES,
    GrowthAction,
    LayerGraph,
    PolicyOutput,
)
from esper.tamiyo.reward import REWARD_COMPONENTS

MLP = [option.name for option in BLUEPRINT_CATALOG].index("mlp_h32")
LOWRANK = [option.name for option in BLUEPRINT_CATALOG].index("lowrank_r8")
SHORT = EpisodeConfig(warmup_steps=30, steps_after=20)


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


class ScriptedPolicy:
    """Germinates the named layer with one option at every decision it may (records masks)."""

    def __init__(self, layer: str | None, option: int = MLP) -> None:
        self.layer, self.option = layer, option
        self.seen: list[LayerGraph] = []

    @property
    def name(self) -> str:
        return "scripted"

    def act(self, graph: LayerGraph, *, explore: bool = False) -> PolicyOutput:
        self.seen.append(graph)
        action = GrowthAction()
        if self.layer is not None:
            node = graph.layer_names.index(self.layer)
            if graph.germinate_mask[node, self.option]:
                action = GrowthAction(node, self.option)
        return PolicyOutput(action, log_prob=-0.5, value=0.25, confidence=1.0, uncertainty=0.0)


def test_bottleneck_task_instances_are_seeded_and_shaped() -> None:
    task = BottleneckTask(branch_choices=(3, 5))
    a, b = task.sample(7), task.sample(7)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert a.bottleneck == b.bottleneck
    k = len(a.host.branches)  # type: ignore[arg-type]
    assert k in (3, 5)
    assert a.x_train.shape == (1024, k * 4) and a.y_train.shape == (1024, 1)
    assert a.host(a.x_train[:2]).shape == (2, 1)
    positions = {BottleneckTask().sample(seed).bottleneck for seed in range(40)}
    assert positions == {f"branches.{i}" for i in range(4)}  # the bottleneck moves around
    with pytest.raises(ConfigurationError, match="outside"):
        BottleneckTask(bottleneck=9).sample(0)


def test_germination_goes_through_kasmina_and_the_reward_is_the_seven_component_one() -> None:
    policy = ScriptedPolicy("branches.1")
    result = run_episode(BottleneckTask(), policy, seed=3, config=SHORT)
    assert [g.layer_name for g in result.germinations] == ["branches.1"]
    germ = result.germinations[0]
    assert germ.option == "mlp_h32" and germ.step == 30
    # residual MLP 4 -> 32 -> 8 with biases
    assert germ.parameters == 4 * 32 + 32 + 32 * 8 + 8 == result.added_parameters
    assert result.base_parameters == 4 * (4 * 8 + 8) + (32 + 1)
    assert set(result.reward.components) == set(REWARD_COMPONENTS)
    assert result.reward.components["parameter_efficiency"] == pytest.approx(
        -germ.parameters / result.base_parameters
    )
    assert result.reward.components["loss_improvement"] == pytest.approx(
        math.log(result.val_loss_start / result.val_loss_final)
    )
    assert len(result.transitions) == 1
    last = result.transitions[-1]
    assert last.done and last.reward == pytest.approx(result.reward.total)
    assert last.log_prob == -0.5 and last.value == 0.25
    assert last.action == GrowthAction(1, MLP).index()
    assert result.hit_bottleneck == (result.bottleneck == "branches.1")


def test_mask_follows_the_option_whitelist_and_the_germination_budget() -> None:
    policy = ScriptedPolicy("head")
    config = EpisodeConfig(warmup_steps=20, decisions=3, decision_every=10, steps_after=5)
    result = run_episode(BottleneckTask(), policy, seed=1, config=config)
    assert [t.graph.step for t in result.transitions] == [20, 30, 40]
    first, second, third = (t.graph.germinate_mask for t in result.transitions)
    assert first[:, MLP].all() and not first[:, LOWRANK].any()  # only mlp_h32 by default
    assert not second.any() and not third.any()  # budget of one germination spent
    assert [t.reward for t in result.transitions[:2]] == [0.0, 0.0]
    assert [t.done for t in result.transitions] == [False, False, True]

    open_config = EpisodeConfig(warmup_steps=20, steps_after=0, allowed_options=None)
    graph = run_episode(BottleneckTask(), RandomPolicy(0), seed=1, config=open_config)
    assert graph.transitions[0].graph.germinate_mask[:, LOWRANK].all()


class RoguePolicy(ScriptedPolicy):
    """Ignores the mask: always germinates node 0 with the low-rank adapter."""

    def act(self, graph: LayerGraph, *, explore: bool = False) -> PolicyOutput:
        return PolicyOutput(GrowthAction(0, LOWRANK), 0.0, 0.0, 1.0, 0.0)


def test_a_policy_returning_a_masked_action_is_refused() -> None:
    config = EpisodeConfig(warmup_steps=10, steps_after=0)
    with pytest.raises(ConfigurationError, match="mask forbids"):
        run_episode(BottleneckTask(), RoguePolicy(None), seed=0, config=config)


def test_waiting_adds_nothing_and_costs_nothing() -> None:
    result = run_episode(BottleneckTask(), ScriptedPolicy(None), seed=2, config=SHORT)
    assert result.germinations == [] and result.added_parameters == 0
    c = result.reward.components
    assert c["parameter_efficiency"] == 0.0 and c["memory_cost"] == 0.0
    assert c["compute_cost"] == 0.0


def test_episodes_are_reproducible() -> None:
    a = run_episode(BottleneckTask(), RandomPolicy(5), seed=11, config=SHORT)
    b = run_episode(BottleneckTask(), RandomPolicy(5), seed=11, config=SHORT)
    assert a.germinations == b.germinations
    assert a.val_loss_final == b.val_loss_final
    assert torch.equal(a.transitions[0].graph.node_features, b.transitions[0].graph.node_features)
    assert a.reward.total == b.reward.total


def test_classification_tasks_report_accuracy() -> None:
    config = EpisodeConfig(warmup_steps=40, steps_after=40, learning_rate=0.01)
    digits = run_episode(DigitsTask(), ScriptedPolicy("fc2"), seed=0, config=config)
    assert digits.accuracy_start is not None and digits.accuracy_final is not None
    assert digits.accuracy_final > 0.5  # learning, 10 classes
    assert digits.layer_names == ("fc1", "fc2", "out")  # the hosts' MLP (esper.tasks.hosts)
    assert digits.reward.components["accuracy_improvement"] == pytest.approx(
        digits.accuracy_final - digits.accuracy_start
    )
    mnist = run_episode(MNIST1DTask(num_samples=500), ScriptedPolicy("fc2"), seed=0, config=config)
    assert mnist.accuracy_final is not None and mnist.accuracy_final > 0.15
    assert mnist.germinations[0].layer_name == "fc2"


def test_bottleneck_branch_shows_the_largest_output_spread() -> None:
    """The signal a policy must read: at the decision step the bottleneck branch has the largest
    output std among the branches in most instances (chance: 1 in 4)."""
    task = BottleneckTask()
    config = EpisodeConfig(steps_after=0)
    std = NODE_FEATURES.index("output_std")
    hits = 0
    for seed in range(12):
        result = run_episode(task, ScriptedPolicy(None), seed=seed, config=config)
        graph = result.transitions[0].graph
        branches = [i for i, name in enumerate(graph.layer_names) if name.startswith("branches")]
        top = max(branches, key=lambda i: float(graph.node_features[i, std]))
        hits += graph.layer_names[top] == result.bottleneck
    assert hits >= 10


@pytest.mark.slow
def test_a_kernel_at_the_bottleneck_relieves_it_best() -> None:
    task = BottleneckTask()
    for seed in (0, 1, 2):
        bottleneck = task.sample(seed).bottleneck
        assert bottleneck is not None
        other = "branches.0" if bottleneck != "branches.0" else "branches.1"
        at_bottleneck = run_episode(task, ScriptedPolicy(bottleneck), seed=seed)
        elsewhere = run_episode(task, ScriptedPolicy(other), seed=seed)
        at_head = run_episode(task, ScriptedPolicy("head"), seed=seed)
        best_other = min(elsewhere.val_loss_final, at_head.val_loss_final)
        assert at_bottleneck.val_loss_final < 0.9 * best_other
