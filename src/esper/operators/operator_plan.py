"""What a widen or deepen decision would add to the host, learnt without changing the model.

The training side budgets every decision before applying it (:mod:`esper.tolaria.
decision_limits`). A residual kernel's cost comes from its blueprint; a structural operator's
comes from the host's shapes: a widen of layer A by *k* units adds *k* rows of A (and their
biases), *k* input columns of its consumer B and the norm's *k* channels between; a fresh block
after a layer of width *w* adds its two projections; a copied block adds what its source has.
FLOPs per sample are counted for Linear layers (``2 x`` multiply-adds; convolutions: 0, not
estimated). Nothing is allocated or traced beyond the ``torch.fx`` walk of the widen data flow.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from esper.contracts import AdaptationDecision, GrowthOperator
from esper.errors import ConfigurationError
from esper.operators import block_stacks
from esper.operators.dataflow import find_widen_path, host_module

DEEPEN_KERNEL_SIZE = 3
"""Kernel size of the fresh conv block ``deepen(after=...)`` inserts."""


@dataclass(frozen=True)
class OperatorPlan:
    """How one structural decision would be applied, and what it costs.

    Attributes:
        operator: WIDEN or DEEPEN.
        layer_name: the decision's layer.
        units: WIDEN: the *k* new units; DEEPEN: 0.
        init: the initialisation the operator is called with.
        parameters: parameters it adds.
        bytes: bytes of those parameters (and of a BatchNorm's new running statistics).
        flops: forward FLOPs per sample it adds (Linear layers only).
        stack: DEEPEN ``copy``: the block stack the copy goes into (else ``None``).
        index: DEEPEN ``copy``: the source block's index in ``stack``.
    """

    operator: GrowthOperator
    layer_name: str
    units: int
    init: str
    parameters: int
    bytes: int
    flops: int = 0
    stack: str | None = None
    index: int = 0


def widen_units(width: int, size: float) -> int:
    """New units of a widen by ``size`` (a fraction of ``width``): at least one."""
    return max(1, round(width * size))


def plan_operator(root: nn.Module, decision: AdaptationDecision) -> OperatorPlan:
    """The plan of a WIDEN or DEEPEN decision on the wrapped host ``root``.

    Raises:
        ConfigurationError: the operator cannot apply to the layer (``"cannot widen ..."``, no
            block stack to copy from, ...); the model is unchanged.
    """
    if decision.operator is GrowthOperator.WIDEN:
        return _plan_widen(root, decision)
    if decision.operator is GrowthOperator.DEEPEN:
        return _plan_deepen(root, decision)
    raise ConfigurationError(f"{decision.operator} is not a structural operator")


def _plan_widen(root: nn.Module, decision: AdaptationDecision) -> OperatorPlan:
    assert decision.size is not None  # the contract requires it for WIDEN
    path = find_widen_path(root, decision.layer_name)
    modules = dict(root.named_modules())
    producer = host_module(modules[path.producer])
    consumer = host_module(modules[path.consumer])
    assert isinstance(producer, nn.Linear | nn.Conv1d | nn.Conv2d)
    assert isinstance(consumer, nn.Linear | nn.Conv1d | nn.Conv2d)
    k = widen_units(producer.weight.shape[0], decision.size)
    fan_in = producer.weight[0].numel() + (1 if producer.bias is not None else 0)
    fan_out = consumer.weight[:, 0].numel()
    parameters = k * (fan_in + fan_out)
    buffers = 0
    if path.norm is not None:
        norm = host_module(modules[path.norm])
        parameters += 2 * k if getattr(norm, "weight", None) is not None else 0
        buffers = 2 * k if isinstance(norm, nn.BatchNorm1d | nn.BatchNorm2d) else 0
    linear = isinstance(producer, nn.Linear) and isinstance(consumer, nn.Linear)
    element = producer.weight.element_size()
    return OperatorPlan(
        GrowthOperator.WIDEN,
        decision.layer_name,
        units=k,
        init=decision.init or "random",
        parameters=parameters,
        bytes=(parameters + buffers) * element,
        flops=2 * k * (fan_in + fan_out) if linear else 0,
    )


def _plan_deepen(root: nn.Module, decision: AdaptationDecision) -> OperatorPlan:
    init = decision.init or "fresh"
    if init == "copy":
        stack, index = _enclosing_block(root, decision.layer_name)
        source = block_stacks.children_of(block_stacks.submodule(root, stack, what="stack"))[index]
        parameters = sum(p.numel() for p in source.parameters())
        element = next((p.element_size() for p in source.parameters()), 4)
        return OperatorPlan(
            GrowthOperator.DEEPEN, decision.layer_name, 0, init, parameters,
            parameters * element, stack=stack, index=index,
        )  # fmt: skip
    point = block_stacks.stack_after(root, decision.layer_name)
    layer, width = block_stacks.output_width(point.stack, point.index)
    if isinstance(layer, nn.Conv1d | nn.Conv2d):
        taps = DEEPEN_KERNEL_SIZE ** (1 if isinstance(layer, nn.Conv1d) else 2)
        parameters, flops = 2 * (width * width * taps + width), 0
    else:
        parameters, flops = 2 * (width * width + width), 4 * width * width
    element = next((p.element_size() for p in layer.parameters()), 4)
    return OperatorPlan(
        GrowthOperator.DEEPEN, decision.layer_name, 0, init, parameters, parameters * element,
        flops=flops,
    )  # fmt: skip


def _enclosing_block(root: nn.Module, layer_name: str) -> tuple[str, int]:
    """The block stack holding ``layer_name`` inside one of its blocks, and that block's index."""
    for stack in sorted(block_stacks.block_stacks(root), key=len, reverse=True):
        prefix = f"{stack}." if stack else ""
        if not layer_name.startswith(prefix):
            continue
        head, _, rest = layer_name[len(prefix) :].partition(".")
        if rest and head.isdigit():
            return stack, int(head)
    raise ConfigurationError(
        f"cannot deepen by copying the block of {layer_name!r}: it is not inside a block of a "
        "block stack (nn.Sequential/nn.ModuleList of blocks); use init 'fresh' (a new block "
        "after the layer)"
    )
