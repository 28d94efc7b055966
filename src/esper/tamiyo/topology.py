"""Model topology: a training run's seeded structure, as the controller needs it.

In process the controller reads the :class:`~esper.core.MorphableModel` itself; as its own
process it receives a :class:`~esper.contracts.ModelTopology`, which the training side builds
with :func:`model_topology` and publishes once on ``telemetry.topology``. Either way the graph
builder gets the same :class:`~esper.tamiyo.graph.GraphStructure` (:func:`topology_structure`
for a received topology, :func:`~esper.tamiyo.graph.graph_structure` for a model).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from esper.contracts import KernelTarget, LayerTopology, ModelTopology
from esper.tamiyo.graph import GraphStructure, trace_edges

if TYPE_CHECKING:
    from esper.core import MorphableModel


def model_topology(model: MorphableModel, *, run_id: str) -> ModelTopology:
    """Describe ``model``'s seeded structure (edges from an fx trace, as the graph builder does)."""
    layers = [model.layer(name) for name in model.layer_names]
    edges = trace_edges(model, layers)
    return ModelTopology(
        run_id=run_id,
        layers=tuple(
            LayerTopology(
                layer_name=layer.layer_name,
                target=layer.target(),
                base_parameters=sum(p.numel() for p in layer.base.parameters()),
                num_seeds=layer.num_seeds,
            )
            for layer in layers
        ),
        edges=tuple(edges) if edges is not None else None,
        traced=edges is not None,
        base_parameters=sum(p.numel() for p in model.base_parameters()),
    )


def topology_structure(topology: ModelTopology) -> GraphStructure:
    """The graph builder's static structure for a topology received from the training side."""
    return GraphStructure.from_layers(
        [layer.layer_name for layer in topology.layers],
        [layer.target for layer in topology.layers],
        [layer.base_parameters for layer in topology.layers],
        topology.edges,
        traced=topology.traced,
    )


def model_targets(model: MorphableModel) -> dict[str, KernelTarget]:
    """The kernel geometry each seeded layer of ``model`` accepts, by layer name."""
    return {name: model.layer(name).target() for name in model.layer_names}


def topology_targets(topology: ModelTopology) -> dict[str, KernelTarget]:
    """The kernel geometry each layer of a received topology accepts, by layer name."""
    return {layer.layer_name: layer.target for layer in topology.layers}
