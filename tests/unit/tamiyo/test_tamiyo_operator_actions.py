"""Tamiyo's widen/deepen actions: the operator mask (where an operator applies, what it costs),
the width-bottleneck heuristic, and the shipped GNN policy deciding as before on such graphs."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

import esper
from esper.contracts import GrowthOperator
from esper.tamiyo import make_baseline
from esper.tamiyo.baselines import BottleneckPolicy, WidthBottleneckPolicy
from esper.tamiyo.graph import GlobalState, build_layer_graph
from esper.tamiyo.observation import OPERATOR_CATALOG, GrowthAction, LayerGraph
from esper.tamiyo.operator_actions import OperatorActions, operator_choice, operator_names
from esper.tamiyo.policy import load_gnn_policy
from esper.tolaria.growth import PRETRAINED_POLICY

WIDEN_50 = next(j for j, o in enumerate(OPERATOR_CATALOG) if o.name == "widen_50")
DEEPEN_FRESH = next(j for j, o in enumerate(OPERATOR_CATALOG) if o.name == "deepen_fresh")


def _graph(*, residual: bool = True, blocked: frozenset[str] = frozenset()) -> LayerGraph:
    torch.manual_seed(0)
    host = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    model = esper.wrap(host, seeds_per_layer=1)
    graph = build_layer_graph(model, {}, globals=GlobalState(progress=0.3), step=10)
    actions = OperatorActions(model.model, ["widen_50", "deepen_fresh"], residual=residual)
    return actions.annotate(graph, blocked)


def test_run_settings_name_the_catalog_entries() -> None:
    assert operator_names(widen=[0.5, 0.3], deepen=["copy"]) == ["widen_50", "deepen_copy"]


def test_mask_covers_operator_by_layer_and_masks_what_does_not_apply() -> None:
    graph = _graph()
    assert graph.layer_names == ("0", "2", "4")
    mask = graph.operator_mask
    assert mask is not None and mask.shape == (3, len(OPERATOR_CATALOG))
    assert mask[:, WIDEN_50].tolist() == [True, True, False]  # the output layer has no consumer
    assert mask[:, DEEPEN_FRESH].all()
    assert int(mask.sum()) == 5  # entries the run did not allow are masked everywhere
    assert operator_choice(graph, 0, WIDEN_50) == (True, 4 * (6 + 1) + 4 * 8)
    assert operator_choice(graph, 1, WIDEN_50)[1] == 4 * (8 + 1) + 4 * 3  # consumer: 3 outputs
    assert operator_choice(graph, 2, WIDEN_50) == (False, 0)


def test_blocked_layers_and_kernels_off() -> None:
    graph = _graph(residual=False, blocked=frozenset({"0"}))
    assert graph.operator_mask is not None
    assert not graph.operator_mask[0].any()
    assert not graph.germinate_mask.any()


def test_width_bottleneck_widens_the_layer_under_most_pressure() -> None:
    graph = _graph()
    pressure = BottleneckPolicy().pressure(graph)
    output = WidthBottleneckPolicy().act(graph)
    assert output.action.operator == WIDEN_50 and output.action.option is None
    assert output.action.node == int(torch.argmax(pressure[:2]))  # among widenable layers
    assert OPERATOR_CATALOG[WIDEN_50].operator is GrowthOperator.WIDEN
    assert make_baseline("width_bottleneck").name == "width_bottleneck"


def test_width_bottleneck_without_operators_is_the_bottleneck_policy() -> None:
    graph = dataclasses.replace(_graph(), operator_mask=None, operator_parameters=None)
    assert WidthBottleneckPolicy().act(graph).action == BottleneckPolicy().act(graph).action


def test_shipped_gnn_policy_decides_as_before_on_graphs_with_operators() -> None:
    policy = load_gnn_policy(PRETRAINED_POLICY)
    graph = _graph()
    plain = dataclasses.replace(graph, operator_mask=None, operator_parameters=None)
    with_ops, without = policy.act(graph), policy.act(plain)
    assert with_ops.action == without.action and with_ops.action.operator is None
    assert with_ops.log_prob == without.log_prob
    assert GrowthAction(0, operator=WIDEN_50).is_wait is False
