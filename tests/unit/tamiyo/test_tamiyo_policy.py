"""GNN policy: masked actions are never emitted, greedy acting is deterministic, the ensemble's
spread is the uncertainty, batching matches single graphs, and save/load round-trips safely."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

import esper
from esper.errors import ConfigurationError
from esper.tamiyo.graph import GlobalState, build_layer_graph
from esper.tamiyo.observation import (
    BLUEPRINT_CATALOG,
    GLOBAL_FEATURES,
    NODE_FEATURES,
    GrowthAction,
    GrowthPolicy,
    LayerGraph,
)
from esper.tamiyo.policy import (
    GNNPolicy,
    GNNPolicyConfig,
    encode_graph,
    load_gnn_policy,
    read_policy_header,
)

K = len(BLUEPRINT_CATALOG)


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def random_graph(n: int, seed: int, *, allow: float = 0.3) -> LayerGraph:
    g = torch.Generator().manual_seed(seed)
    src = torch.arange(n - 1)
    return LayerGraph(
        layer_names=tuple(f"l{i}" for i in range(n)),
        node_features=torch.randn((n, len(NODE_FEATURES)), generator=g),
        edge_index=torch.stack([src, src + 1]) if n > 1 else torch.zeros((2, 0), dtype=torch.long),
        germinate_mask=torch.rand((n, K), generator=g) < allow,
        global_features=torch.randn(len(GLOBAL_FEATURES), generator=g),
        step=seed,
    )


def small_policy(**overrides: int) -> GNNPolicy:
    options = {"hidden": 32, "layers": 2, "ensemble": 3, "init_seed": 0, **overrides}
    return GNNPolicy(GNNPolicyConfig(**options))


def test_gnn_policy_is_a_growth_policy() -> None:
    policy: GrowthPolicy = small_policy()
    assert policy.name == "gnn"


def test_masked_actions_get_zero_probability_and_are_never_emitted() -> None:
    policy = small_policy()
    sampled = 0
    for seed in range(60):
        graph = random_graph(1 + seed % 7, seed)
        mask = graph.action_mask()
        logits, _ = policy(policy.collate([graph]))
        probs = GNNPolicy.mixture(logits.detach())[0]  # (A,)
        assert probs.shape == (graph.num_actions,)
        assert torch.all(probs[~mask] == 0.0)
        assert float(probs.sum()) == pytest.approx(1.0, abs=1e-5)
        for explore in (False, True, True, True):
            out = policy.act(graph, explore=explore)
            assert mask[out.action.index()], f"masked action {out.action} emitted"
            sampled += not out.action.is_wait
    assert sampled > 50  # germinations were actually sampled, not just waits


def test_fully_masked_graph_can_only_wait() -> None:
    graph = random_graph(4, 0, allow=0.0)
    policy = small_policy()
    for _ in range(20):
        out = policy.act(graph, explore=True)
        assert out.action.is_wait
        assert out.confidence == pytest.approx(1.0)
        assert out.log_prob == pytest.approx(0.0, abs=1e-6)


def test_greedy_acting_is_deterministic_and_takes_the_most_probable_action() -> None:
    policy = small_policy()
    graph = random_graph(6, 3, allow=0.6)
    first = policy.act(graph)
    assert all(policy.act(graph) == first for _ in range(5))
    with torch.no_grad():
        probs = GNNPolicy.mixture(policy(policy.collate([graph]))[0])[0]
    assert first.action.index() == int(torch.argmax(probs))
    assert first.confidence == pytest.approx(float(probs.max()), rel=1e-5)
    assert first.log_prob == pytest.approx(math.log(float(probs.max())), rel=1e-5)


def test_exploration_is_seeded() -> None:
    graph = random_graph(6, 4, allow=0.8)
    a = GNNPolicy(GNNPolicyConfig(hidden=32, layers=2), sample_seed=5)
    b = GNNPolicy(GNNPolicyConfig(hidden=32, layers=2), sample_seed=5)
    assert [a.act(graph, explore=True).action for _ in range(20)] == [
        b.act(graph, explore=True).action for _ in range(20)
    ]


def test_uncertainty_is_the_spread_of_the_ensemble_heads() -> None:
    graph = random_graph(5, 7, allow=0.7)
    policy = small_policy(ensemble=4)
    out = policy.act(graph)
    with torch.no_grad():
        logits, values = policy(policy.collate([graph]))
    per_head = torch.softmax(logits[0], dim=-1)[:, out.action.index()]  # (E,)
    assert out.uncertainty == pytest.approx(float(per_head.std(unbiased=False)), rel=1e-5)
    assert out.uncertainty > 0  # heads start from different weights
    assert out.value == pytest.approx(float(values[0].mean()), rel=1e-5)
    single = small_policy(ensemble=1).act(graph)
    assert single.uncertainty == 0.0


def test_batched_evaluation_matches_single_graphs() -> None:
    policy = small_policy()
    graphs = [random_graph(n, 10 + n, allow=0.5) for n in (2, 5, 1, 7)]
    outputs = [policy.act(g) for g in graphs]
    actions = torch.tensor([o.action.index() for o in outputs])
    evaluation = policy.evaluate_actions(graphs, actions)
    assert evaluation.log_prob.tolist() == pytest.approx([o.log_prob for o in outputs], abs=1e-5)
    assert evaluation.values.shape == (4, 3)
    assert evaluation.values.mean(dim=1).tolist() == pytest.approx(
        [o.value for o in outputs], abs=1e-5
    )
    assert torch.all(evaluation.entropy >= 0)
    evaluation.log_prob.sum().backward()
    assert policy.node_in.weight.grad is not None


def test_relative_health_encoding_standardizes_health_over_the_graph() -> None:
    graph = random_graph(5, 1)
    data = encode_graph(graph, relative_health=True)
    assert data.x.shape == (5, len(NODE_FEATURES) + 6)
    relative = data.x[:, len(NODE_FEATURES) :]
    assert relative.mean(dim=0).abs().max() < 1e-5
    assert data.edge_index.shape == (2, 8)  # data-flow edges and their reverses
    assert data.edge_attr[:4].tolist() == [[1.0, 0.0]] * 4
    assert data.edge_attr[4:].tolist() == [[0.0, 1.0]] * 4
    single = encode_graph(random_graph(1, 2), relative_health=True)
    assert torch.all(single.x[:, len(NODE_FEATURES) :] == 0)


def test_works_on_a_real_model_graph() -> None:
    host = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10))
    model = esper.wrap(host)
    graph = build_layer_graph(model, {}, globals=GlobalState(progress=0.5), step=3)
    out = small_policy().act(graph)
    assert graph.action_mask()[out.action.index()]


def test_save_and_load_round_trip_from_bytes_and_path(tmp_path: Path) -> None:
    policy = small_policy(ensemble=2)
    graph = random_graph(5, 11, allow=0.6)
    data = policy.to_bytes(extra={"note": "test"})
    header = read_policy_header(data)
    assert header["config"]["ensemble"] == 2
    assert header["extra"] == {"note": "test"}
    assert header["node_features"] == list(NODE_FEATURES)
    from_bytes = load_gnn_policy(data)
    path = policy.save(tmp_path / "policy.safetensors")
    from_path = load_gnn_policy(path)
    for loaded in (from_bytes, from_path):
        assert loaded.config == policy.config
        for (name, a), (_, b) in zip(
            policy.state_dict().items(), loaded.state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), name
        assert loaded.act(graph) == policy.act(graph)


def test_loading_refuses_foreign_or_mismatched_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="no policy file"):
        load_gnn_policy(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigurationError, match="not an Esper GNN policy"):
        load_gnn_policy(b"\x00" * 4)
    from safetensors.torch import save

    with pytest.raises(ConfigurationError, match="not an Esper GNN policy"):
        load_gnn_policy(save({"w": torch.zeros(2)}))

    data = small_policy().to_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    meta = json.loads(header["__metadata__"]["esper.gnn_policy"])
    meta["node_features"] = ["something", "else"]
    header["__metadata__"]["esper.gnn_policy"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    tampered = struct.pack("<Q", len(raw)) + raw + data[8 + length :]
    with pytest.raises(ConfigurationError, match="retrain the policy"):
        load_gnn_policy(tampered)


def test_config_is_validated() -> None:
    with pytest.raises(ConfigurationError, match="multiple of"):
        GNNPolicyConfig(hidden=30, attention_heads=4)
    with pytest.raises(ConfigurationError, match="ensemble"):
        GNNPolicyConfig(ensemble=0)


def test_action_index_layout_matches_the_observation_contract() -> None:
    graph = random_graph(3, 0, allow=0.0)
    mask = graph.germinate_mask.clone()
    mask[2, 1] = True
    only = LayerGraph(
        graph.layer_names, graph.node_features, graph.edge_index, mask, graph.global_features, 0
    )
    policy = small_policy()
    logits, _ = policy(policy.collate([only]))
    finite = torch.isfinite(logits[0, 0]).nonzero().flatten().tolist()
    assert finite == [0, GrowthAction(2, 1).index()]
