"""Layer-graph builder: traced edges, static and health features, the germinate mask, caching."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import esper
from esper.blueprints import create_artifact
from esper.contracts import SeedState
from esper.errors import ConfigurationError
from esper.execution import InMemoryArtifactSource
from esper.tamiyo.graph import (
    GlobalState,
    GraphStructure,
    LayerHealthSummary,
    build_layer_graph,
    graph_structure,
)
from esper.tamiyo.observation import BLUEPRINT_CATALOG, GLOBAL_FEATURES, NODE_FEATURES
from factories import health_signal

COL = {name: i for i, name in enumerate(NODE_FEATURES)}
OPT = {option.name: j for j, option in enumerate(BLUEPRINT_CATALOG)}


class ResidualNet(nn.Module):
    """a -> b -> c with a skip a -> norm, then norm -> out."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h = h + self.c(torch.relu(self.b(h)))
        return self.out(self.norm(h))


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.third = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        if h.sum() > 0:
            h = self.second(h)
        return self.third(h)


def edges(graph_edge_index: torch.Tensor, names: tuple[str, ...]) -> set[tuple[str, str]]:
    return {(names[s], names[d]) for s, d in graph_edge_index.t().tolist()}


def test_edges_follow_traced_data_flow_including_skip_connections() -> None:
    model = esper.wrap(ResidualNet(), seeds_per_layer=2)
    graph = build_layer_graph(model, {}, globals=GlobalState(), step=0)
    assert graph.layer_names == ("a", "b", "c", "norm", "out")
    assert edges(graph.edge_index, graph.layer_names) == {
        ("a", "b"),
        ("b", "c"),
        ("c", "norm"),
        ("a", "norm"),  # the residual path skips b and c
        ("norm", "out"),
    }
    assert graph_structure(model).traced


def test_edges_see_through_unseeded_layers() -> None:
    host = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    model = esper.wrap(host, target_layers=["0", "4"])  # the middle Linear is not seeded
    graph = build_layer_graph(model, {}, globals=GlobalState(), step=0)
    assert edges(graph.edge_index, graph.layer_names) == {("0", "4")}


def test_untraceable_model_falls_back_to_module_order_chain() -> None:
    model = esper.wrap(Untraceable())
    structure = graph_structure(model)
    assert not structure.traced
    assert edges(structure.edge_index, structure.layer_names) == {
        ("first", "second"),
        ("second", "third"),
    }


def test_static_features_describe_kind_width_depth_and_size() -> None:
    host = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten())
    host.append(nn.Linear(4 * 36, 10))
    model = esper.wrap(host, seeds_per_layer=4)
    graph = build_layer_graph(model, {}, globals=GlobalState(), step=0)
    x = graph.node_features
    assert x.shape == (3, len(NODE_FEATURES))
    assert x.dtype == torch.float32
    assert x[0, COL["kind_conv2d"]] == 1 and x[0, COL["kind_linear"]] == 0
    assert x[1, COL["kind_batch_norm2d"]] == 1
    assert x[2, COL["kind_linear"]] == 1
    assert x[:, COL["kind_linear"] : COL["kind_multihead_attention"] + 1].sum(dim=1).tolist() == [
        1,
        1,
        1,
    ]
    assert x[2, COL["log2_in_features"]].item() == pytest.approx(math.log2(144))
    assert x[2, COL["log2_out_features"]].item() == pytest.approx(math.log2(10))
    assert x[:, COL["depth"]].tolist() == [0.0, 0.5, 1.0]
    assert x[2, COL["log10_parameters"]].item() == pytest.approx(math.log10(1 + 144 * 10 + 10))
    assert x[:, COL["seeds_free_fraction"]].tolist() == [1.0, 1.0, 1.0]
    assert x[:, COL["seeds_running"]].tolist() == [0.0, 0.0, 0.0]


def test_health_columns_come_from_summaries_and_missing_layers_are_zero() -> None:
    model = esper.wrap(ResidualNet())
    summary = LayerHealthSummary(
        output_mean=0.5,
        output_std=2.0,
        dead_fraction=0.25,
        log_grad_norm=-1.5,
        grad_norm_zscore=3.0,
        anomaly=1.0,
    )
    graph = build_layer_graph(model, {"c": summary}, globals=GlobalState(), step=7)
    health = graph.node_features[:, :6]
    assert health[2].tolist() == [0.5, 2.0, 0.25, -1.5, 3.0, 1.0]
    assert health[[0, 1, 3, 4]].abs().sum().item() == 0.0
    assert graph.step == 7


def test_summary_from_signal_takes_log_of_grad_norm() -> None:
    signal = health_signal(
        "a", samples=2, output_mean=0.1, output_std=0.3, dead_fraction=0.5, grad_norm=math.e**2
    )
    summary = LayerHealthSummary.from_signal(signal)
    assert summary.log_grad_norm == pytest.approx(2.0)
    assert (summary.output_mean, summary.output_std, summary.dead_fraction) == (0.1, 0.3, 0.5)
    no_grad = LayerHealthSummary.from_signal(signal.model_copy(update={"grad_norm": None}))
    assert no_grad.log_grad_norm == 0.0


def test_globals_are_placed_in_global_feature_order() -> None:
    model = esper.wrap(ResidualNet())
    state = GlobalState(progress=0.25, kernel_parameter_fraction=0.1, adaptations=2, loss=0.7)
    graph = build_layer_graph(model, {}, globals=state, step=0)
    assert graph.global_features.shape == (len(GLOBAL_FEATURES),)
    assert graph.global_features.tolist() == pytest.approx([0.25, 0.1, 2.0, 0.7, 0.0])
    with pytest.raises(ConfigurationError, match="GlobalState"):
        build_layer_graph(model, {}, globals=torch.zeros(3), step=0)


def test_mask_requires_compatible_blueprint_free_seed_and_open_gate() -> None:
    host = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10))
    source = InMemoryArtifactSource()
    model = esper.wrap(host, seeds_per_layer=1, kernel_source=source)
    graph = build_layer_graph(model, {}, globals=GlobalState(), step=0)
    # conv layer (4 channels): conv adapters fit; rank 8 exceeds both widths; residual MLP fits.
    assert graph.germinate_mask[0].tolist() == [False, True, True, True]
    # linear layer: feature kernels only
    assert graph.germinate_mask[1].tolist() == [True, True, False, False]

    blocked = build_layer_graph(model, {}, globals=GlobalState(), step=0, blocked={"3": "cooldown"})
    assert not blocked.germinate_mask[1].any()
    assert blocked.germinate_mask[0].tolist() == graph.germinate_mask[0].tolist()

    data, meta = create_artifact(
        BLUEPRINT_CATALOG[OPT["lowrank_r8"]].spec, model.layer("3").target()
    )
    source.add(data)
    model.load_kernel_sync("3", seed_idx=0, kernel_artifact_id=meta.kernel_id)
    assert model.seed_state("3", 0) is SeedState.BLENDING
    grown = build_layer_graph(model, {}, globals=GlobalState(), step=1)
    assert not grown.germinate_mask[1].any()  # its only seed is taken
    assert grown.node_features[1, COL["seeds_free_fraction"]] == 0.0
    assert grown.node_features[1, COL["seeds_running"]] == 1.0
    assert grown.action_mask().tolist() == [True, *grown.germinate_mask.reshape(-1).tolist()]
    # the remote path (seed states as data) gives the same observation as the in-process one
    states = {name: model.layer(name).seed_states for name in grown.layer_names}
    remote = graph_structure(model).build({}, seed_states=states, globals=GlobalState(), step=1)
    assert torch.equal(remote.node_features, grown.node_features)
    assert torch.equal(remote.germinate_mask, grown.germinate_mask)


def test_structure_is_cached_per_model_and_shared_by_builds() -> None:
    model = esper.wrap(ResidualNet())
    first = build_layer_graph(model, {}, globals=GlobalState(), step=0)
    second = build_layer_graph(model, {}, globals=GlobalState(), step=1)
    assert graph_structure(model) is graph_structure(model)
    assert first.edge_index is second.edge_index
    other = esper.wrap(ResidualNet())
    assert graph_structure(other) is not graph_structure(model)


def test_structure_from_plain_description_matches_the_model_one() -> None:
    model = esper.wrap(ResidualNet())
    from_model = graph_structure(model)
    layers = [model.layer(name) for name in from_model.layer_names]
    described = GraphStructure.from_layers(
        from_model.layer_names,
        [layer.target() for layer in layers],
        [sum(p.numel() for p in layer.base.parameters()) for layer in layers],
        [tuple(e) for e in from_model.edge_index.t().tolist()],
    )
    assert torch.equal(described.static_features, from_model.static_features)
    assert torch.equal(described.compatible, from_model.compatible)
    states = {name: model.layer(name).seed_states for name in from_model.layer_names}
    graph = described.build({}, seed_states=states, globals=GlobalState(), step=0)
    assert torch.equal(graph.germinate_mask, from_model.compatible)
    with pytest.raises(ConfigurationError, match="outside"):
        GraphStructure.from_layers(["x"], [layers[0].target()], [1], [(0, 3)])


def test_unwrapped_model_is_refused_with_a_hint() -> None:
    with pytest.raises(ConfigurationError, match="wrap the model first"):
        build_layer_graph(nn.Linear(2, 2), {}, globals=GlobalState(), step=0)
