"""Widen/deepen actions of Tamiyo: which apply to which layer, what each costs, the decision.

A run that allows widen or deepen (``growth.operators``) gives its controller the
:data:`~esper.tamiyo.observation.OPERATOR_CATALOG` entries it may use. For each layer of the
graph, :class:`OperatorActions` learns once (the host's shapes, :func:`~esper.operators.
operator_plan.plan_operator`) whether each applies and how many parameters it adds; at every
decision the graph gets ``operator_mask`` (those, minus layers a safety gate closed) and
``operator_parameters``. Residual kernels keep their own mask (``germinate_mask``), emptied when
the run turns them off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence

import torch
from torch import nn

from esper.contracts import AdaptationAction, AdaptationDecision
from esper.errors import EsperError
from esper.operators.operator_plan import plan_operator
from esper.tamiyo.observation import OPERATOR_CATALOG, LayerGraph, OperatorOption


def operator_names(*, widen: Sequence[float], deepen: Sequence[str]) -> list[str]:
    """The catalog entries a run's ``growth.operators`` allow (widen sizes must be catalog
    sizes to be offered to a policy: 0.25, 0.5, 1.0)."""
    return [
        option.name
        for option in OPERATOR_CATALOG
        if (option.size is not None and option.size in widen)
        or (option.size is None and option.init in deepen)
    ]


class OperatorActions:
    """The widen/deepen actions one controller offers its policy.

    Args:
        root: the wrapped host (``MorphableModel.model``).
        allowed: catalog entry names the run allows.
        residual: whether residual kernels stay allowed.
    """

    def __init__(self, root: nn.Module, allowed: Collection[str], *, residual: bool) -> None:
        self.root = root
        self.allowed = frozenset(allowed)
        self.residual = residual
        self._static: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def annotate(self, graph: LayerGraph, blocked: Collection[str]) -> LayerGraph:
        """``graph`` with its operator mask and costs (and no kernels if they are off)."""
        applies, costs = self._applicability(graph)
        open_rows = torch.tensor([name not in blocked for name in graph.layer_names])
        mask = applies & open_rows.reshape(-1, 1)
        germinate = graph.germinate_mask if self.residual else graph.germinate_mask & False
        return dataclasses.replace(
            graph, germinate_mask=germinate, operator_mask=mask, operator_parameters=costs
        )

    def _applicability(self, graph: LayerGraph) -> tuple[torch.Tensor, torch.Tensor]:
        key = graph.layer_names
        if key not in self._static:
            n, k = len(key), len(OPERATOR_CATALOG)
            applies = torch.zeros((n, k), dtype=torch.bool)
            costs = torch.zeros((n, k), dtype=torch.float32)
            for i, layer in enumerate(key):
                for j, option in enumerate(OPERATOR_CATALOG):
                    if option.name not in self.allowed:
                        continue
                    try:
                        plan = plan_operator(self.root, decision_for(option, layer, graph.step))
                    except (EsperError, ValueError):
                        continue
                    applies[i, j], costs[i, j] = True, float(plan.parameters)
            self._static[key] = (applies, costs)
        return self._static[key]


def operator_choice(graph: LayerGraph, node: int, operator: int) -> tuple[bool, int]:
    """Whether ``graph`` allows operator ``operator`` on ``node``, and the parameters it adds."""
    mask, costs = graph.operator_mask, graph.operator_parameters
    if mask is None or costs is None or not 0 <= operator < mask.shape[1]:
        return False, 0
    return bool(mask[node, operator]), int(costs[node, operator])


def decision_for(
    option: OperatorOption,
    layer: str,
    step: int,
    *,
    run_id: str = "plan",
    policy: str = "plan",
    confidence: float = 1.0,
    uncertainty: float = 0.0,
    reason: str = "",
) -> AdaptationDecision:
    """The GERMINATE decision applying ``option`` to ``layer``."""
    return AdaptationDecision(
        run_id=run_id, step=step, action=AdaptationAction.GERMINATE, layer_name=layer,
        seed_idx=0, policy=policy, confidence=confidence, uncertainty=uncertainty,
        reason=reason, operator=option.operator, size=option.size, init=option.init,
    )  # fmt: skip
