"""Baseline growth policies: random, round-robin, a bottleneck heuristic and its widening form.

All three implement :class:`~esper.tamiyo.observation.GrowthPolicy` and only ever choose actions
that ``LayerGraph.germinate_mask`` allows; when nothing is allowed they wait. They are the yardsticks
the learned GNN policy is measured against, and usable controllers on their own
(``esper tamiyo serve --policy bottleneck``).

Which blueprint a deterministic baseline germinates is fixed by a preference list over
:data:`~esper.tamiyo.observation.BLUEPRINT_CATALOG` names: the first allowed one is taken.
Their state (a cursor, an RNG) round-trips through ``state_dict()`` as plain JSON-able data.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch

from esper.errors import ConfigurationError
from esper.tamiyo.observation import (
    BLUEPRINT_CATALOG,
    NODE_FEATURES,
    OPERATOR_CATALOG,
    GrowthAction,
    GrowthPolicy,
    LayerGraph,
    PolicyOutput,
)

DEFAULT_PREFERENCE: tuple[str, ...] = ("mlp_h32", "conv_pointwise", "lowrank_r8", "conv_depthwise")
"""Catalog options in the order deterministic baselines try them: a non-linear residual first
(it can add the depth or non-linearity a layer lacks), then the cheaper adapters."""

_CATALOG_INDEX = {option.name: j for j, option in enumerate(BLUEPRINT_CATALOG)}
_LOG_GRAD = NODE_FEATURES.index("log_grad_norm")
_DEAD = NODE_FEATURES.index("dead_fraction")
_LOG10_PARAMS = NODE_FEATURES.index("log10_parameters")


def _option_order(preference: Sequence[str]) -> list[int]:
    unknown = [name for name in preference if name not in _CATALOG_INDEX]
    if unknown:
        raise ConfigurationError(
            f"unknown blueprint option(s) {unknown}; catalog options are "
            f"{[option.name for option in BLUEPRINT_CATALOG]}"
        )
    order = [_CATALOG_INDEX[name] for name in preference]
    return order + [j for j in range(len(BLUEPRINT_CATALOG)) if j not in order]


def _preferred_option(graph: LayerGraph, node: int, order: Sequence[int]) -> int | None:
    row = graph.germinate_mask[node].tolist()
    return next((j for j in order if row[j]), None)


def _wait() -> PolicyOutput:
    return PolicyOutput(GrowthAction(), log_prob=0.0, value=0.0, confidence=1.0, uncertainty=0.0)


class RandomPolicy:
    """Uniform over the allowed germinations (and wait, if ``include_wait``); seeded.

    Args:
        seed: seed of the policy's own RNG (independent of torch's global RNG).
        include_wait: count "wait" as one of the choices; otherwise wait only when nothing is
            allowed.
    """

    def __init__(self, seed: int = 0, *, include_wait: bool = False) -> None:
        self._rng = random.Random(seed)
        self.include_wait = include_wait

    @property
    def name(self) -> str:
        """``"random"``."""
        return "random"

    def act(self, graph: LayerGraph, *, explore: bool = False) -> PolicyOutput:
        """Pick one allowed action uniformly at random (``explore`` changes nothing)."""
        allowed = graph.action_mask().nonzero().flatten().tolist()
        if not self.include_wait:
            allowed = [index for index in allowed if index != 0]
        if not allowed:
            return _wait()
        index = allowed[self._rng.randrange(len(allowed))]
        p = 1.0 / len(allowed)
        return PolicyOutput(
            GrowthAction.from_index(index),
            log_prob=math.log(p),
            value=0.0,
            confidence=p,
            uncertainty=0.0,
        )

    def state_dict(self) -> dict[str, Any]:
        """The RNG state as JSON-able data."""
        version, internal, gauss = self._rng.getstate()
        return {"rng": [version, list(internal), gauss], "include_wait": self.include_wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self.include_wait = bool(state["include_wait"])


class RoundRobinPolicy:
    """Germinates the layers in turn: each call takes the next layer (in model order, wrapping
    around) that has an allowed germination.

    Args:
        preference: catalog option names in the order to try them.
    """

    def __init__(self, preference: Sequence[str] = DEFAULT_PREFERENCE) -> None:
        self._order = _option_order(preference)
        self._next_node = 0

    @property
    def name(self) -> str:
        """``"round_robin"``."""
        return "round_robin"

    def act(self, graph: LayerGraph, *, explore: bool = False) -> PolicyOutput:
        """The next allowed layer after the last one chosen; wait if none is allowed."""
        n = graph.num_nodes
        for offset in range(n):
            node = (self._next_node + offset) % n
            option = _preferred_option(graph, node, self._order)
            if option is not None:
                self._next_node = (node + 1) % n
                return PolicyOutput(
                    GrowthAction(node, option),
                    log_prob=0.0,
                    value=0.0,
                    confidence=1.0,
                    uncertainty=0.0,
                )
        return _wait()

    def state_dict(self) -> dict[str, Any]:
        """The cursor as JSON-able data."""
        return {"next_node": self._next_node}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._next_node = int(state["next_node"])


class BottleneckPolicy:
    """Germinates the allowed layer under the most pressure.

    Pressure is ``log_grad_norm + dead_weight * dead_fraction``; with ``per_parameter`` the
    gradient term is the log of the RMS gradient per parameter (``log_grad_norm - ½ ln P``), so a
    large layer does not win just by having more weights.

    Args:
        dead_weight: weight of the dead-unit fraction in the pressure.
        per_parameter: normalise gradient norms by layer size.
        preference: catalog option names in the order to try them.
    """

    def __init__(
        self,
        *,
        dead_weight: float = 1.0,
        per_parameter: bool = True,
        preference: Sequence[str] = DEFAULT_PREFERENCE,
    ) -> None:
        self.dead_weight = dead_weight
        self.per_parameter = per_parameter
        self._order = _option_order(preference)

    @property
    def name(self) -> str:
        """``"bottleneck"``."""
        return "bottleneck"

    def pressure(self, graph: LayerGraph) -> torch.Tensor:
        """``(N,)`` pressure of each layer (higher: more in need of capacity)."""
        x = graph.node_features
        score = x[:, _LOG_GRAD] + self.dead_weight * x[:, _DEAD]
        if self.per_parameter:
            log_params = x[:, _LOG10_PARAMS] * math.log(10.0)  # ln(1 + P)
            score = score - 0.5 * log_params
        return score

    def act(self, graph: LayerGraph, *, explore: bool = False) -> PolicyOutput:
        """The allowed layer of highest pressure (ties: first in model order); wait if none."""
        allowed = graph.germinate_mask.any(dim=1)
        if not bool(allowed.any()):
            return _wait()
        score = self.pressure(graph).masked_fill(~allowed, -math.inf)
        node = int(torch.argmax(score))
        option = _preferred_option(graph, node, self._order)
        assert option is not None  # the node has an allowed option
        return PolicyOutput(
            GrowthAction(node, option), log_prob=0.0, value=0.0, confidence=1.0, uncertainty=0.0
        )

    def state_dict(self) -> dict[str, Any]:
        """Nothing changes between calls; the settings, for completeness."""
        return {"dead_weight": self.dead_weight, "per_parameter": self.per_parameter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.dead_weight = float(state["dead_weight"])
        self.per_parameter = bool(state["per_parameter"])


class WidthBottleneckPolicy(BottleneckPolicy):
    """Widens the allowed layer under the most pressure (:class:`BottleneckPolicy`'s score: a
    large per-parameter gradient and dead units say the layer is saturated, short of units).

    Of the widen sizes the graph allows there (``operator_mask``), the first of ``sizes`` is
    taken; where no widen is allowed anywhere it germinates a residual kernel like
    :class:`BottleneckPolicy` (or waits).

    Args:
        sizes: widen sizes (fractions of the layer's width) in order of preference.
        dead_weight, per_parameter: see :class:`BottleneckPolicy`.
    """

    def __init__(
        self,
        *,
        sizes: Sequence[float] = (0.5, 0.25, 1.0),
        dead_weight: float = 1.0,
        per_parameter: bool = True,
    ) -> None:
        super().__init__(dead_weight=dead_weight, per_parameter=per_parameter)
        by_size = {o.size: j for j, o in enumerate(OPERATOR_CATALOG) if o.size is not None}
        self._widen_order = [by_size[size] for size in sizes if size in by_size]

    @property
    def name(self) -> str:
        """``"width_bottleneck"``."""
        return "width_bottleneck"

    def act(self, graph: LayerGraph, *, explore: bool = False) -> PolicyOutput:
        """Widen the allowed layer of highest pressure; else :meth:`BottleneckPolicy.act`."""
        mask = graph.operator_mask
        if mask is None or not self._widen_order:
            return super().act(graph, explore=explore)
        widen = mask[:, self._widen_order]
        allowed = widen.any(dim=1)
        if not bool(allowed.any()):
            return super().act(graph, explore=explore)
        score = self.pressure(graph).masked_fill(~allowed, -math.inf)
        node = int(torch.argmax(score))
        column = next(j for j, ok in enumerate(widen[node].tolist()) if ok)
        action = GrowthAction(node, operator=self._widen_order[column])
        return PolicyOutput(action, log_prob=0.0, value=0.0, confidence=1.0, uncertainty=0.0)


BASELINE_NAMES: tuple[str, ...] = ("random", "round_robin", "bottleneck", "width_bottleneck")
"""Names accepted by :func:`make_baseline`."""


def make_baseline(name: str, *, seed: int = 0) -> GrowthPolicy:
    """A baseline policy by name (``random``, ``round_robin``, ``bottleneck``).

    Raises:
        ConfigurationError: ``name`` is not a baseline.
    """
    if name == "random":
        return RandomPolicy(seed)
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "bottleneck":
        return BottleneckPolicy()
    if name == "width_bottleneck":
        return WidthBottleneckPolicy()
    raise ConfigurationError(
        f"unknown baseline policy {name!r}; choose one of {', '.join(BASELINE_NAMES)} (or a path "
        "to a trained policy)"
    )
