"""Tamiyo: the controller that decides where and when to grow, and learns to do it better.

Runtime: :class:`HealthCollector` (smoothed per-layer health from ``telemetry.health``),
:class:`SafetyGates` (every refusal names its gate), :class:`TamiyoController` (health -> layer
graph -> policy -> gates -> decisions on Oona; synchronous or a 100 ms autonomous loop, also as
``esper tamiyo serve``). Policies: the baselines (:class:`RandomPolicy`, :class:`RoundRobinPolicy`,
:class:`BottleneckPolicy`) and the GNN policy (:class:`GNNPolicy`). Offline learning (episodes, PPO and A2C trainers) is
:mod:`esper.tamiyo.learning`, which the runtime never imports.

Importing this package does not import ``torch_geometric``: the GNN policy is imported on first use
of its names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from esper.tamiyo.baselines import (
    BASELINE_NAMES,
    BottleneckPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    make_baseline,
)
from esper.tamiyo.controller import CycleResult, TamiyoController
from esper.tamiyo.graph import (
    GlobalState,
    GraphStructure,
    LayerHealthSummary,
    build_layer_graph,
    graph_structure,
)
from esper.tamiyo.health import HealthCollector
from esper.tamiyo.observation import (
    BLUEPRINT_CATALOG,
    GLOBAL_FEATURES,
    NODE_FEATURES,
    BlueprintOption,
    GrowthAction,
    GrowthPolicy,
    LayerGraph,
    PolicyOutput,
)
from esper.tamiyo.policy_loading import load_policy
from esper.tamiyo.safety import GATES, GateVerdict, Proposal, SafetyConfig, SafetyGates
from esper.tamiyo.topology import model_topology, topology_structure

if TYPE_CHECKING:
    from esper.tamiyo.policy import GNNPolicy, GNNPolicyConfig, load_gnn_policy

_LAZY: dict[str, str] = {
    "GNNPolicy": "esper.tamiyo.policy",
    "GNNPolicyConfig": "esper.tamiyo.policy",
    "load_gnn_policy": "esper.tamiyo.policy",
}

__all__ = [
    "BASELINE_NAMES",
    "BLUEPRINT_CATALOG",
    "GATES",
    "GLOBAL_FEATURES",
    "NODE_FEATURES",
    "BlueprintOption",
    "BottleneckPolicy",
    "CycleResult",
    "GNNPolicy",
    "GNNPolicyConfig",
    "GateVerdict",
    "GlobalState",
    "GraphStructure",
    "GrowthAction",
    "GrowthPolicy",
    "HealthCollector",
    "LayerGraph",
    "LayerHealthSummary",
    "PolicyOutput",
    "Proposal",
    "RandomPolicy",
    "RoundRobinPolicy",
    "SafetyConfig",
    "SafetyGates",
    "TamiyoController",
    "build_layer_graph",
    "graph_structure",
    "load_gnn_policy",
    "load_policy",
    "make_baseline",
    "model_topology",
    "topology_structure",
]


def __getattr__(name: str) -> Any:
    """Import the GNN policy on first use (it needs ``torch_geometric``)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
