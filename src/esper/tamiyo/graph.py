"""Layer-graph builder: turns a morphable model plus per-layer health into a :class:`LayerGraph`.

The graph has one node per seeded layer and an edge ``a -> b`` when ``b`` reads (directly, or
through unseeded operations) what ``a`` produced. Edges come from a ``torch.fx`` symbolic trace of
the wrapped model with :class:`~esper.execution.KasminaLayer` as a leaf module; when the model
cannot be traced (data-dependent control flow, unsupported calls) they fall back to a chain in
module order.

Everything that does not change while a model trains — layer names, edges, the structural node
features, which catalog blueprints fit which layer — is computed once per model and cached
(:func:`graph_structure`); a decision only fills in health, seed counts, the mask and the globals::

    structure = graph_structure(model)            # cached per model
    graph = build_layer_graph(model, health, globals=GlobalState(progress=0.3), step=300)
    policy.act(graph)

A controller that runs in another process and has no model builds a :class:`GraphStructure`
directly from a structural description and calls :meth:`GraphStructure.build`.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from esper.blueprints import is_compatible
from esper.contracts import KernelTarget, SeedState
from esper.errors import ConfigurationError
from esper.execution import KasminaLayer
from esper.execution.layer_kind_registry import FEATURE_KINDS, feature_kind
from esper.tamiyo.observation import (
    BLUEPRINT_CATALOG,
    GLOBAL_FEATURES,
    NODE_FEATURES,
    LayerGraph,
)

logger = logging.getLogger(__name__)

HEALTH_FEATURES: tuple[str, ...] = NODE_FEATURES[:6]
"""The health columns of :data:`NODE_FEATURES` (filled from :class:`LayerHealthSummary`)."""

KIND_FEATURES: dict[str, str] = {kind: f"kind_{kind}" for kind in FEATURE_KINDS}
"""One-hot column of :data:`NODE_FEATURES` for each layer kind that has one; other kinds set
the column of the kind they are registered ``like`` (GPT-2's Conv1D: ``linear``), or none."""

FEATURE_LIMIT = 1e12
"""Largest magnitude a dynamic feature may have in a graph: larger values are clipped to it and
NaN becomes 0, so a policy never sees a non-finite or float32-overflowing input (a policy's
``symlog`` maps the limit to about 27.6)."""

_COLUMN = {name: i for i, name in enumerate(NODE_FEATURES)}
_HEALTH_COLUMNS = [_COLUMN[name] for name in HEALTH_FEATURES]
_FREE = _COLUMN["seeds_free_fraction"]
_RUNNING = _COLUMN["seeds_running"]


@dataclass(frozen=True)
class LayerHealthSummary:
    """Smoothed health of one layer, as the controller's health collector reports it.

    Attributes:
        output_mean: mean of the layer's output (EMA over telemetry windows).
        output_std: standard deviation of the layer's output (EMA).
        dead_fraction: fraction of output units never positive in a recorded batch (EMA), [0, 1].
        log_grad_norm: natural log of the base layer's gradient L2 norm (EMA); 0 if unknown.
        grad_norm_zscore: z-score of the latest gradient norm against the layer's own window.
        anomaly: 1.0 when the layer is flagged anomalous (a score in [0, 1] is allowed), else 0.
    """

    output_mean: float = 0.0
    output_std: float = 0.0
    dead_fraction: float = 0.0
    log_grad_norm: float = 0.0
    grad_norm_zscore: float = 0.0
    anomaly: float = 0.0

    def as_tuple(self) -> tuple[float, float, float, float, float, float]:
        """The values in :data:`HEALTH_FEATURES` order."""
        return (
            self.output_mean,
            self.output_std,
            self.dead_fraction,
            self.log_grad_norm,
            self.grad_norm_zscore,
            float(self.anomaly),
        )


@dataclass(frozen=True)
class GlobalState:
    """Run-level observations, one per entry of :data:`GLOBAL_FEATURES`.

    Attributes:
        progress: fraction of the training budget spent, in [0, 1].
        kernel_parameter_fraction: grafted kernel parameters / base parameters.
        adaptations: germinations so far.
        loss: smoothed training loss.
        loss_trend: recent relative change of the loss (negative: improving).
    """

    progress: float = 0.0
    kernel_parameter_fraction: float = 0.0
    adaptations: float = 0.0
    loss: float = 0.0
    loss_trend: float = 0.0

    def as_tensor(self) -> torch.Tensor:
        """``(len(GLOBAL_FEATURES),)`` float32."""
        return torch.tensor(
            [
                self.progress,
                self.kernel_parameter_fraction,
                self.adaptations,
                self.loss,
                self.loss_trend,
            ],
            dtype=torch.float32,
        )


@dataclass(frozen=True)
class GraphStructure:
    """The parts of a layer graph that do not change while the model trains.

    Attributes:
        layer_names: seeded layers, one per node, in model order.
        edge_index: ``(2, E)`` int64 data-flow edges between nodes.
        static_features: ``(N, len(NODE_FEATURES))`` float32; health and seed columns are zero.
        compatible: ``(N, len(BLUEPRINT_CATALOG))`` bool; whether each catalog blueprint can
            target each layer.
        traced: whether the edges come from an fx trace (False: module-order chain).
    """

    layer_names: tuple[str, ...]
    edge_index: torch.Tensor
    static_features: torch.Tensor
    compatible: torch.Tensor
    traced: bool = False

    @property
    def num_nodes(self) -> int:
        """Number of layers."""
        return len(self.layer_names)

    @classmethod
    def from_layers(
        cls,
        layer_names: Sequence[str],
        targets: Sequence[KernelTarget],
        parameter_counts: Sequence[int],
        edges: Sequence[tuple[int, int]] | None = None,
        *,
        traced: bool = False,
    ) -> GraphStructure:
        """Build the static structure from a plain description of the seeded layers.

        Args:
            layer_names: one name per layer, in model order.
            targets: each layer's kernel geometry (``KasminaLayer.target()``).
            parameter_counts: each layer's base parameter count.
            edges: ``(source, destination)`` node pairs; ``None`` chains the layers in order.
            traced: whether ``edges`` came from the model's traced data flow.

        Raises:
            ConfigurationError: the sequences have different lengths or an edge is out of range.
        """
        n = len(layer_names)
        if len(targets) != n or len(parameter_counts) != n:
            raise ConfigurationError(
                f"graph structure needs one target and one parameter count per layer; got "
                f"{n} names, {len(targets)} targets, {len(parameter_counts)} parameter counts"
            )
        pairs = list(edges) if edges is not None else [(i, i + 1) for i in range(n - 1)]
        for src, dst in pairs:
            if not (0 <= src < n and 0 <= dst < n):
                raise ConfigurationError(
                    f"edge ({src}, {dst}) refers to a node outside 0..{n - 1}; edges are pairs of "
                    "node indices in layer order"
                )
        edge_index = (
            torch.tensor(pairs, dtype=torch.int64).t().contiguous()  # (2, E)
            if pairs
            else torch.zeros((2, 0), dtype=torch.int64)
        )
        depth = _normalized_depth(n, pairs)
        features = torch.zeros((n, len(NODE_FEATURES)), dtype=torch.float32)
        compatible = torch.zeros((n, len(BLUEPRINT_CATALOG)), dtype=torch.bool)
        for i, (target, params) in enumerate(zip(targets, parameter_counts, strict=True)):
            column = KIND_FEATURES.get(feature_kind(target.layer_kind) or "")
            if column is not None:
                features[i, _COLUMN[column]] = 1.0
            features[i, _COLUMN["log2_in_features"]] = math.log2(target.in_features)
            features[i, _COLUMN["log2_out_features"]] = math.log2(target.out_features)
            features[i, _COLUMN["depth"]] = depth[i]
            features[i, _COLUMN["log10_parameters"]] = math.log10(1 + params)
            for j, option in enumerate(BLUEPRINT_CATALOG):
                compatible[i, j] = is_compatible(option.spec, target)
        return cls(tuple(layer_names), edge_index, features, compatible, traced)

    @classmethod
    def from_model(cls, model: nn.Module) -> GraphStructure:
        """Structure of a morphable model (see :func:`graph_structure` for the cached form)."""
        layers = _seeded_layers(model)
        names = [layer.layer_name for layer in layers]
        edges = trace_edges(model, layers)
        return cls.from_layers(
            names,
            [layer.target() for layer in layers],
            [sum(p.numel() for p in layer.base.parameters()) for layer in layers],
            edges,
            traced=edges is not None,
        )

    def build(
        self,
        health: Mapping[str, LayerHealthSummary],
        *,
        seed_states: Mapping[str, Sequence[SeedState]],
        globals: GlobalState | torch.Tensor,
        step: int,
        blocked: Collection[str] = frozenset(),
    ) -> LayerGraph:
        """Fill in the dynamic features and the germinate mask.

        Args:
            health: smoothed health by layer name; a missing layer gets zeros (not observed yet).
            seed_states: every seed's state by layer name; a missing layer counts as no seeds.
            globals: run-level observations (or a ``(len(GLOBAL_FEATURES),)`` tensor).
            step: training step the observation belongs to.
            blocked: layers a safety gate closed (a set of names, or a mapping name -> reason).

        Returns:
            The observation; ``germinate_mask[i, j]`` is True iff layer ``i`` has a DORMANT seed,
            catalog blueprint ``j`` fits it, and it is not blocked.
        """
        free, running, has_free = [], [], []
        for name in self.layer_names:
            states = list(seed_states.get(name, ()))
            dormant = states.count(SeedState.DORMANT)
            free.append(dormant / len(states) if states else 0.0)
            running.append(float(sum(1 for state in states if state.runs_kernel)))
            has_free.append(dormant > 0 and name not in blocked)
        return self._assemble(health, free, running, has_free, globals, step)

    def _assemble(
        self,
        health: Mapping[str, LayerHealthSummary],
        free: list[float],
        running: list[float],
        has_free: list[bool],
        globals: GlobalState | torch.Tensor,
        step: int,
    ) -> LayerGraph:
        """The observation from per-node seed counts (see :meth:`build`)."""
        n = self.num_nodes
        zeros = LayerHealthSummary()
        health_rows = [health.get(name, zeros).as_tuple() for name in self.layer_names]
        features = self.static_features.clone()
        if n:
            features[:, _HEALTH_COLUMNS] = _bounded(torch.tensor(health_rows), "health")
            features[:, _FREE] = torch.tensor(free, dtype=torch.float32)
            features[:, _RUNNING] = torch.tensor(running, dtype=torch.float32)
        mask = self.compatible & torch.tensor(has_free, dtype=torch.bool).reshape(n, 1)
        global_tensor = globals.as_tensor() if isinstance(globals, GlobalState) else globals
        if global_tensor.shape != (len(GLOBAL_FEATURES),):
            raise ConfigurationError(
                f"globals must have shape ({len(GLOBAL_FEATURES)},) in GLOBAL_FEATURES order "
                f"{GLOBAL_FEATURES}, got {tuple(global_tensor.shape)}; pass a GlobalState"
            )
        return LayerGraph(
            layer_names=self.layer_names,
            node_features=features,
            edge_index=self.edge_index,
            germinate_mask=mask,
            global_features=_bounded(global_tensor, "global"),
            step=step,
        )


def _bounded(values: torch.Tensor, what: str) -> torch.Tensor:
    """``values`` as float32 within ``±FEATURE_LIMIT``, NaN replaced by 0 (logged: the health
    collector and the controller never pass such values on, so one arriving here is news)."""
    values = values.to(torch.float64)  # clip before float32 could overflow to inf
    if not bool(torch.isfinite(values).all()):
        logger.warning("layer graph: non-finite %s features replaced (NaN -> 0, inf clipped)", what)
    bounded = torch.nan_to_num(values, nan=0.0, posinf=FEATURE_LIMIT, neginf=-FEATURE_LIMIT)
    return bounded.clamp(-FEATURE_LIMIT, FEATURE_LIMIT).to(torch.float32)


_STRUCTURE_CACHE: weakref.WeakKeyDictionary[nn.Module, GraphStructure] = weakref.WeakKeyDictionary()
_NODES_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[KasminaLayer, ...]] = (
    weakref.WeakKeyDictionary()
)


def graph_structure(model: nn.Module) -> GraphStructure:
    """The cached :class:`GraphStructure` of a morphable model (computed on first use).

    Seeded layers are fixed once a model is wrapped, so the structure never goes stale.
    """
    structure = _STRUCTURE_CACHE.get(model)
    if structure is None:
        structure = GraphStructure.from_model(model)
        _STRUCTURE_CACHE[model] = structure
    return structure


def build_layer_graph(
    model: nn.Module,
    health: Mapping[str, LayerHealthSummary],
    *,
    globals: GlobalState | torch.Tensor,
    step: int,
    blocked: Collection[str] = frozenset(),
) -> LayerGraph:
    """The observation of ``model`` at ``step`` (structure cached, seed states read from the host).

    Args:
        model: a :class:`~esper.core.MorphableModel`.
        health: smoothed health by layer name (missing layers get zeros).
        globals: run-level observations.
        step: training step of the observation.
        blocked: layers closed by a safety gate (names, or a mapping name -> reason).
    """
    structure = graph_structure(model)
    free, running, has_free = [], [], []
    for name, layer in zip(structure.layer_names, _nodes(model), strict=True):
        layout = layer.seed_layout
        dormant = [slot.state for slot in layout.slots].count(SeedState.DORMANT)
        free.append(dormant / layout.num_seeds)
        running.append(float(len(layout.running)))
        has_free.append(dormant > 0 and name not in blocked)
    return structure._assemble(health, free, running, has_free, globals, step)


def _nodes(model: nn.Module) -> tuple[KasminaLayer, ...]:
    """The seeded layers of ``model`` in node order (cached with the structure)."""
    nodes = _NODES_CACHE.get(model)
    if nodes is None:
        nodes = tuple(_seeded_layers(model))
        _NODES_CACHE[model] = nodes
    return nodes


def _layer_map(model: nn.Module) -> Mapping[str, KasminaLayer]:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, Mapping):
        raise ConfigurationError(
            f"expected a MorphableModel (from esper.wrap), got {type(model).__name__}; wrap the "
            "model first"
        )
    return layers


def _seeded_layers(model: nn.Module) -> list[KasminaLayer]:
    layers = _layer_map(model)
    unique: dict[int, KasminaLayer] = {}
    for layer in layers.values():
        unique.setdefault(id(layer), layer)
    return list(unique.values())


class _KasminaLeafTracer(torch.fx.Tracer):
    """An fx tracer that records each :class:`KasminaLayer` as one opaque call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, KasminaLayer) or super().is_leaf_module(m, module_qualified_name)


def trace_edges(model: nn.Module, layers: Sequence[KasminaLayer]) -> list[tuple[int, int]] | None:
    """Data-flow edges between seeded layers from an fx trace, or ``None`` if tracing fails.

    An edge ``(a, b)`` means layer ``b`` consumes, possibly through unseeded operations, a value
    computed by layer ``a`` (and by no seeded layer in between).
    """
    root = getattr(model, "model", model)
    index = {id(layer): i for i, layer in enumerate(layers)}
    try:
        graph = _KasminaLeafTracer().trace(root)
    except Exception as exc:  # fx raises many types for untraceable code
        logger.info("layer graph: fx trace failed (%s); using module order for edges", exc)
        return None
    modules = dict(root.named_modules(remove_duplicate=False))
    reaching: dict[torch.fx.Node, frozenset[int]] = {}
    edges: set[tuple[int, int]] = set()
    for node in graph.nodes:
        sources: frozenset[int] = frozenset().union(
            *(reaching.get(arg, frozenset()) for arg in node.all_input_nodes)
        )
        seeded = None
        if node.op == "call_module":
            seeded = index.get(id(modules.get(str(node.target))))
        if seeded is None:
            reaching[node] = sources
            continue
        edges.update((src, seeded) for src in sources if src != seeded)
        reaching[node] = frozenset({seeded})
    return sorted(edges)


def _normalized_depth(n: int, edges: Sequence[tuple[int, int]]) -> list[float]:
    """Longest-path depth of each node from a source, divided by the largest (0 for one node).

    Edges that point backwards in model order (cycles from shared modules) are ignored.
    """
    depth = [0] * n
    incoming: list[list[int]] = [[] for _ in range(n)]
    for src, dst in edges:
        if src < dst:
            incoming[dst].append(src)
    for i in range(n):
        depth[i] = max((depth[src] + 1 for src in incoming[i]), default=0)
    deepest = max(depth, default=0)
    return [d / deepest if deepest else 0.0 for d in depth]
