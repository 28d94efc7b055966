"""Baseline policies: every choice respects the mask; random is uniform and seeded; round-robin
cycles; the bottleneck heuristic follows gradient/dead-unit pressure."""

from __future__ import annotations

import collections
import json
import math

import pytest
import torch

from esper.errors import ConfigurationError
from esper.tamiyo.baselines import (
    BottleneckPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    make_baseline,
)
from esper.tamiyo.observation import (
    BLUEPRINT_CATALOG,
    GLOBAL_FEATURES,
    NODE_FEATURES,
    GrowthAction,
    LayerGraph,
)

COL = {name: i for i, name in enumerate(NODE_FEATURES)}
K = len(BLUEPRINT_CATALOG)
MLP = [option.name for option in BLUEPRINT_CATALOG].index("mlp_h32")
LOWRANK = [option.name for option in BLUEPRINT_CATALOG].index("lowrank_r8")


def make_graph(
    n: int,
    *,
    mask: torch.Tensor | None = None,
    log_grad: list[float] | None = None,
    dead: list[float] | None = None,
    log10_params: list[float] | None = None,
) -> LayerGraph:
    x = torch.zeros((n, len(NODE_FEATURES)))
    if log_grad is not None:
        x[:, COL["log_grad_norm"]] = torch.tensor(log_grad)
    if dead is not None:
        x[:, COL["dead_fraction"]] = torch.tensor(dead)
    if log10_params is not None:
        x[:, COL["log10_parameters"]] = torch.tensor(log10_params)
    if mask is None:
        mask = torch.zeros((n, K), dtype=torch.bool)
        mask[:, :2] = True  # feature layers: lowrank and mlp
    return LayerGraph(
        layer_names=tuple(f"l{i}" for i in range(n)),
        node_features=x,
        edge_index=torch.tensor([list(range(n - 1)), list(range(1, n))], dtype=torch.int64),
        germinate_mask=mask,
        global_features=torch.zeros(len(GLOBAL_FEATURES)),
        step=0,
    )


def random_masks(count: int, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand((n, K), generator=g) < 0.3 for _ in range(count)]


@pytest.mark.parametrize("name", ["random", "round_robin", "bottleneck"])
def test_baselines_never_choose_a_masked_action(name: str) -> None:
    policy = make_baseline(name, seed=3)
    germinations = 0
    for i, mask in enumerate(random_masks(300, 5, seed=1)):
        graph = make_graph(5, mask=mask, log_grad=torch.randn(5).tolist())
        out = policy.act(graph, explore=bool(i % 2))
        assert graph.action_mask()[out.action.index()]
        if out.action.is_wait:
            assert not mask.any(), "a baseline waited although a germination was allowed"
        else:
            germinations += 1
    assert germinations > 250  # most random masks allow something


def test_all_masked_means_wait() -> None:
    graph = make_graph(3, mask=torch.zeros((3, K), dtype=torch.bool))
    for policy in (RandomPolicy(0), RoundRobinPolicy(), BottleneckPolicy()):
        assert policy.act(graph).action.is_wait


def test_random_is_uniform_over_allowed_actions_and_reproducible() -> None:
    mask = torch.zeros((3, K), dtype=torch.bool)
    mask[0, 0] = mask[1, 1] = mask[2, 0] = mask[2, 1] = True
    graph = make_graph(3, mask=mask)
    policy = RandomPolicy(seed=7)
    picks = [policy.act(graph) for _ in range(4000)]
    counts = collections.Counter(p.action.index() for p in picks)
    allowed = {GrowthAction(0, 0).index(), GrowthAction(1, 1).index()}
    allowed |= {GrowthAction(2, 0).index(), GrowthAction(2, 1).index()}
    assert set(counts) == allowed
    for count in counts.values():
        assert abs(count / 4000 - 0.25) < 0.03
    assert picks[0].log_prob == pytest.approx(math.log(0.25))
    assert picks[0].confidence == pytest.approx(0.25)

    again = RandomPolicy(seed=7)
    assert [again.act(graph).action for _ in range(50)] == [p.action for p in picks[:50]]

    with_wait = RandomPolicy(seed=7, include_wait=True)
    waits = sum(with_wait.act(graph).action.is_wait for _ in range(2000))
    assert abs(waits / 2000 - 0.2) < 0.03


def test_random_state_round_trips_through_json() -> None:
    graph = make_graph(6)
    policy = RandomPolicy(seed=11)
    policy.act(graph)
    state = json.loads(json.dumps(policy.state_dict()))
    expected = [policy.act(graph).action for _ in range(20)]
    restored = RandomPolicy(seed=0)
    restored.load_state_dict(state)
    assert [restored.act(graph).action for _ in range(20)] == expected


def test_round_robin_cycles_layers_and_skips_blocked_ones() -> None:
    mask = torch.zeros((4, K), dtype=torch.bool)
    mask[[0, 1, 3], :2] = True  # layer 2 blocked
    policy = RoundRobinPolicy()
    nodes = [policy.act(make_graph(4, mask=mask)).action.node for _ in range(7)]
    assert nodes == [0, 1, 3, 0, 1, 3, 0]
    options = {policy.act(make_graph(4, mask=mask)).action.option for _ in range(3)}
    assert options == {MLP}  # the preferred non-linear residual

    restored = RoundRobinPolicy()
    restored.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    assert (
        restored.act(make_graph(4, mask=mask)).action == policy.act(make_graph(4, mask=mask)).action
    )


def test_round_robin_falls_back_to_the_next_preferred_option() -> None:
    mask = torch.zeros((2, K), dtype=torch.bool)
    mask[:, LOWRANK] = True
    policy = RoundRobinPolicy()
    assert policy.act(make_graph(2, mask=mask)).action == GrowthAction(0, LOWRANK)
    with pytest.raises(ConfigurationError, match="catalog options"):
        RoundRobinPolicy(preference=["no_such_option"])


def test_bottleneck_picks_highest_gradient_pressure_among_allowed_layers() -> None:
    policy = BottleneckPolicy(per_parameter=False)
    graph = make_graph(4, log_grad=[-3.0, 1.0, -1.0, 0.5])
    assert policy.act(graph).action == GrowthAction(1, MLP)

    mask = graph.germinate_mask.clone()
    mask[1] = False
    blocked = make_graph(4, mask=mask, log_grad=[-3.0, 1.0, -1.0, 0.5])
    assert policy.act(blocked).action.node == 3

    dead = make_graph(3, log_grad=[0.0, 0.0, 0.0], dead=[0.0, 0.1, 0.9])
    assert policy.act(dead).action.node == 2


def test_bottleneck_per_parameter_discounts_large_layers() -> None:
    # layer 0: grad norm e^1 over 10^4 params; layer 1: e^0 over 10^1 params -> larger RMS grad.
    graph = make_graph(2, log_grad=[1.0, 0.0], log10_params=[4.0, 1.0])
    assert BottleneckPolicy(per_parameter=False).act(graph).action.node == 0
    assert BottleneckPolicy(per_parameter=True).act(graph).action.node == 1
    pressure = BottleneckPolicy().pressure(graph)
    assert pressure.tolist() == pytest.approx([1.0 - 2.0 * math.log(10), -0.5 * math.log(10)])


def test_make_baseline_names_the_choices_on_error() -> None:
    assert make_baseline("bottleneck").name == "bottleneck"
    assert make_baseline("round_robin").name == "round_robin"
    assert make_baseline("random").name == "random"
    with pytest.raises(ConfigurationError, match="random, round_robin, bottleneck"):
        make_baseline("greedy")
