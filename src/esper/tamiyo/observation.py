"""Observations and actions of a growth policy: the layer graph it sees and what it may choose.

Every policy — the learned GNN and the random, round-robin and bottleneck baselines — implements
:class:`GrowthPolicy`: it receives a :class:`LayerGraph` (one node per seeded layer, edges along
the model's data flow, features from health signals and structure) and returns a
:class:`PolicyOutput` choosing one :class:`GrowthAction`: wait, or germinate one layer with one
option of :data:`BLUEPRINT_CATALOG`. Actions that are not allowed (no free seed, a blueprint that
cannot target the layer, a gate that is closed) are masked out by ``germinate_mask`` and must
never be chosen.

Flat action index: ``0`` is "wait"; ``1 + node * len(BLUEPRINT_CATALOG) + option`` germinates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from esper.contracts import BlueprintSpec, GrowthOperator

NODE_FEATURES: tuple[str, ...] = (
    # health, smoothed over the layer's window (EMA)
    "output_mean",
    "output_std",
    "dead_fraction",
    "log_grad_norm",
    "grad_norm_zscore",
    "anomaly",
    # structure
    "kind_linear",
    "kind_conv1d",
    "kind_conv2d",
    "kind_layer_norm",
    "kind_batch_norm1d",
    "kind_batch_norm2d",
    "kind_multihead_attention",
    "log2_in_features",
    "log2_out_features",
    "depth",
    "log10_parameters",
    "seeds_free_fraction",
    "seeds_running",
)
"""Columns of :attr:`LayerGraph.node_features`, in order."""

GLOBAL_FEATURES: tuple[str, ...] = (
    "progress",
    "kernel_parameter_fraction",
    "adaptations",
    "loss",
    "loss_trend",
)
"""Entries of :attr:`LayerGraph.global_features`, in order: training progress in [0, 1],
grafted parameters / base parameters, adaptations so far, smoothed training loss, and its recent
relative change (negative: improving)."""


@dataclass(frozen=True)
class BlueprintOption:
    """One entry of the action catalog: a named blueprint a policy may germinate."""

    name: str
    spec: BlueprintSpec


BLUEPRINT_CATALOG: tuple[BlueprintOption, ...] = (
    BlueprintOption("lowrank_r8", BlueprintSpec(family="lowrank_adapter", params={"rank": 8})),
    BlueprintOption(
        "mlp_h32",
        BlueprintSpec(family="residual_mlp", params={"hidden": 32, "activation": "relu"}),
    ),
    BlueprintOption(
        "conv_pointwise",
        BlueprintSpec(family="conv_adapter", params={"mode": "pointwise", "hidden": 16}),
    ),
    BlueprintOption(
        "conv_depthwise", BlueprintSpec(family="conv_adapter", params={"mode": "depthwise"})
    ),
)
"""The blueprints a policy chooses among, in action-index order."""


@dataclass(frozen=True)
class OperatorOption:
    """One structural action a policy may choose for a layer (:mod:`esper.operators`)."""

    name: str
    operator: GrowthOperator
    size: float | None
    init: str


OPERATOR_CATALOG: tuple[OperatorOption, ...] = (
    OperatorOption("widen_25", GrowthOperator.WIDEN, 0.25, "random"),
    OperatorOption("widen_50", GrowthOperator.WIDEN, 0.5, "random"),
    OperatorOption("widen_100", GrowthOperator.WIDEN, 1.0, "random"),
    OperatorOption("deepen_fresh", GrowthOperator.DEEPEN, None, "fresh"),
    OperatorOption("deepen_copy", GrowthOperator.DEEPEN, None, "copy"),
)
"""Widen and deepen actions, in ``operator_mask`` column order. They are outside the flat
(GNN) action index: a policy that does not know them never sees them."""


@dataclass(frozen=True)
class LayerGraph:
    """What a growth policy observes at one decision point.

    Attributes:
        layer_names: seeded layers, one per node, in model order.
        node_features: ``(N, len(NODE_FEATURES))`` float32.
        edge_index: ``(2, E)`` int64, source -> destination along the data flow.
        germinate_mask: ``(N, len(BLUEPRINT_CATALOG))`` bool; True where germinating is allowed.
        global_features: ``(len(GLOBAL_FEATURES),)`` float32.
        step: training step the observation was taken at.
        operator_mask: ``(N, len(OPERATOR_CATALOG))`` bool, True where the run allows that
            widen/deepen on that layer and it applies there; ``None``: no operators in this run.
        operator_parameters: ``(N, len(OPERATOR_CATALOG))`` parameters each would add (0 where
            it does not apply), or ``None``.
    """

    layer_names: tuple[str, ...]
    node_features: torch.Tensor
    edge_index: torch.Tensor
    germinate_mask: torch.Tensor
    global_features: torch.Tensor
    step: int
    operator_mask: torch.Tensor | None = None
    operator_parameters: torch.Tensor | None = None

    @property
    def num_nodes(self) -> int:
        """Number of layers in the graph."""
        return len(self.layer_names)

    @property
    def num_actions(self) -> int:
        """Size of the flat action space: wait plus every (node, option) pair."""
        return 1 + self.num_nodes * len(BLUEPRINT_CATALOG)

    def action_mask(self) -> torch.Tensor:
        """``(num_actions,)`` bool mask of the flat action space (wait is always allowed)."""
        return torch.cat([torch.ones(1, dtype=torch.bool), self.germinate_mask.reshape(-1)])


@dataclass(frozen=True)
class GrowthAction:
    """Wait (``node is None``), germinate layer ``node`` with catalog option ``option``, or
    apply :data:`OPERATOR_CATALOG` entry ``operator`` to it (``option`` then ``None``)."""

    node: int | None = None
    option: int | None = None
    operator: int | None = None

    @property
    def is_wait(self) -> bool:
        """Whether this action does nothing."""
        return self.node is None

    def index(self) -> int:
        """The flat action index."""
        if self.node is None or self.option is None:
            return 0
        return 1 + self.node * len(BLUEPRINT_CATALOG) + self.option

    @classmethod
    def from_index(cls, index: int) -> GrowthAction:
        """Inverse of :meth:`index`."""
        if index == 0:
            return cls()
        node, option = divmod(index - 1, len(BLUEPRINT_CATALOG))
        return cls(node=node, option=option)


@dataclass(frozen=True)
class PolicyOutput:
    """A policy's choice with the quantities its trainer and safety gates need."""

    action: GrowthAction
    log_prob: float
    value: float
    confidence: float
    """Probability the policy gave the chosen action, in [0, 1]."""
    uncertainty: float
    """Epistemic uncertainty of the choice (e.g. ensemble or MC-dropout spread); 0 if none."""


class GrowthPolicy(Protocol):
    """Anything that picks growth actions from layer graphs."""

    @property
    def name(self) -> str:
        """Short name used in decisions and reports."""
        ...

    def act(self, graph: LayerGraph, *, explore: bool = False) -> PolicyOutput:
        """Choose an allowed action for ``graph`` (sample if ``explore``, else the best one)."""
        ...


@dataclass(frozen=True)
class ActionEvaluation:
    """A policy's view of a batch of (observation, action) pairs, with gradients.

    Attributes:
        log_prob: ``(B,)`` log-probability of each action.
        entropy: ``(B,)`` entropy of each action distribution.
        values: ``(B, E)`` state values from each of E value heads (E = 1 without an ensemble).
    """

    log_prob: torch.Tensor
    entropy: torch.Tensor
    values: torch.Tensor
