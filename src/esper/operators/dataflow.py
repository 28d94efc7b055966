"""Widen data flow: which module consumes a layer's output, and what sits in between.

Widening layer A by *k* units gives it *k* more output features (Linear) or channels (Conv);
every module on the way to A's consumer B must carry them too. :func:`find_widen_path` traces the
host with ``torch.fx`` (seeded layers and Esper's widening wrappers as opaque calls) and follows
A's output through single-use operations until it reaches B:

* at most one norm: ``BatchNorm1d/2d`` over A's channels or ``LayerNorm`` over A's features;
* any number of elementwise activations (modules or functions: ReLU, GELU, Tanh, SiLU...),
  dropout, identity and, between convolutions, pooling (which keeps channels apart);
* B: a Linear (after a Linear A) or a Conv of the same dimension (after a Conv A) reading exactly
  A's ``n`` features.

Anything else -- A's output used twice (a residual), a reshape, an attention, a grouped conv, the
model's output -- is refused with :class:`~esper.errors.ConfigurationError` ``"cannot widen
<layer>: <why>"``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from esper.errors import ConfigurationError
from esper.execution import KasminaLayer

ProducerModule = nn.Linear | nn.Conv1d | nn.Conv2d
NormModule = nn.BatchNorm1d | nn.BatchNorm2d | nn.LayerNorm

ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.Tanh,
    nn.SiLU,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Softplus,
    nn.Hardtanh,
    nn.Identity,
    nn.Dropout,
)
"""Modules applied to every feature on its own; a widened layer's new units pass through them."""

CHANNELWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)
"""Modules that keep channels apart (only between convolutions)."""

ELEMENTWISE_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {
        F.relu,
        F.gelu,
        F.silu,
        F.leaky_relu,
        F.elu,
        F.dropout,
        torch.relu,
        torch.tanh,
        torch.sigmoid,
        F.tanh,
        F.sigmoid,
    }
)
ELEMENTWISE_METHODS = frozenset({"relu", "tanh", "sigmoid"})


@dataclass(frozen=True)
class WidenPath:
    """What widening one layer touches, by dotted module name in the host.

    Attributes:
        producer: layer A, whose output units grow.
        norm: the norm between A and B, if any.
        consumer: layer B, whose input units grow.
        activations: the elementwise operations between A and B, in order (names for messages).
        zero_slope_at_zero: some activation between A and B has derivative 0 at 0 (ReLU).
    """

    producer: str
    norm: str | None
    consumer: str
    activations: tuple[str, ...]
    zero_slope_at_zero: bool


class _WidenTracer(fx.Tracer):
    """Seeded layers and widening wrappers are single opaque calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        opaque = isinstance(m, KasminaLayer) or type(m).__module__.startswith("esper.operators")
        return opaque or super().is_leaf_module(m, module_qualified_name)


def host_module(module: nn.Module) -> nn.Module:
    """The module doing the work: a seeded layer's base, else ``module`` itself."""
    return module.base if isinstance(module, KasminaLayer) else module


def find_widen_path(root: nn.Module, layer_name: str) -> WidenPath:
    """Follow ``layer_name``'s output through ``root`` to the module that consumes it.

    Raises:
        ConfigurationError: ``"cannot widen <layer>: <why>"`` when the layer is not a Linear or
            Conv, the model cannot be traced, or what follows it cannot be widened with it.
    """
    modules = dict(root.named_modules())
    if layer_name not in modules:
        raise ConfigurationError(f"cannot widen {layer_name!r}: the model has no such module")
    producer = host_module(modules[layer_name])
    if not isinstance(producer, ProducerModule):
        raise ConfigurationError(
            f"cannot widen {layer_name!r}: it is a {type(producer).__name__}; only Linear, "
            "Conv1d and Conv2d layers can be widened"
        )
    _check_plain_conv(layer_name, producer)
    try:
        graph = _WidenTracer().trace(root)
    except Exception as exc:  # fx raises many types for untraceable code
        raise ConfigurationError(
            f"cannot widen {layer_name!r}: the model cannot be traced by torch.fx ({exc}); widen "
            "needs its data-flow graph to find what consumes the layer's output"
        ) from exc
    nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == layer_name]
    if len(nodes) != 1:
        raise ConfigurationError(
            f"cannot widen {layer_name!r}: it is called {len(nodes)} times in one forward; "
            "only a layer called once can be widened"
        )
    return _follow(layer_name, producer, nodes[0], modules)


def _follow(
    layer_name: str, producer: nn.Module, node: fx.Node, modules: dict[str, nn.Module]
) -> WidenPath:
    width = _out_units(producer)
    is_conv = isinstance(producer, nn.Conv1d | nn.Conv2d)
    norm: str | None = None
    activations: list[str] = []
    zero_slope = False
    while True:
        users = list(node.users)
        if len(users) != 1:
            what = "the model's output" if not users else f"{len(users)} operations"
            raise ConfigurationError(
                f"cannot widen {layer_name!r}: the output of {_describe(node)} is used by "
                f"{what} ({', '.join(_describe(u) for u in users)}); widen needs one chain "
                "from the layer to a single consumer"
            )
        user = users[0]
        if user.op == "output":
            raise ConfigurationError(
                f"cannot widen {layer_name!r}: its output reaches the model's output; the last "
                "layer's width is the model's output width"
            )
        if user.op == "call_module" and user.args[:1] == (node,):
            name = str(user.target)
            module = host_module(modules[name])
            if _is_consumer(module, producer, width):
                if len(user.args) != 1 or user.kwargs:
                    raise ConfigurationError(
                        f"cannot widen {layer_name!r}: its consumer {name!r} takes extra arguments"
                    )
                return WidenPath(layer_name, norm, name, tuple(activations), zero_slope)
            if isinstance(module, NormModule) and norm is None and _norm_fits(module, width):
                norm = name
            elif isinstance(module, ELEMENTWISE_MODULES) or (
                is_conv and isinstance(module, CHANNELWISE_MODULES)
            ):
                activations.append(name)
                zero_slope = zero_slope or isinstance(module, nn.ReLU | nn.ReLU6)
            else:
                raise ConfigurationError(
                    f"cannot widen {layer_name!r}: its output goes through {name!r} "
                    f"({type(module).__name__}), which Esper cannot widen with it; widen works "
                    "through one BatchNorm/LayerNorm, elementwise activations and dropout to a "
                    "Linear or Conv consumer"
                )
        elif _is_elementwise_call(user, node):
            activations.append(_describe(user))
            zero_slope = zero_slope or user.target in (F.relu, torch.relu, "relu")
        else:
            raise ConfigurationError(
                f"cannot widen {layer_name!r}: its output goes into {_describe(user)}, which "
                "Esper cannot widen through (only elementwise activations, dropout and one norm "
                "may sit between the layer and its Linear/Conv consumer)"
            )
        node = user


def _is_consumer(module: nn.Module, producer: nn.Module, width: int) -> bool:
    if isinstance(producer, nn.Linear):
        return isinstance(module, nn.Linear) and module.in_features == width
    if type(module) is not type(producer):
        return False
    assert isinstance(module, nn.Conv1d | nn.Conv2d)
    return module.in_channels == width and module.groups == 1 and module.padding_mode == "zeros"


def _norm_fits(norm: nn.Module, width: int) -> bool:
    if isinstance(norm, nn.LayerNorm):
        return tuple(norm.normalized_shape) == (width,)
    assert isinstance(norm, nn.BatchNorm1d | nn.BatchNorm2d)
    return norm.num_features == width and norm.momentum is not None


def _is_elementwise_call(user: fx.Node, node: fx.Node) -> bool:
    if user.args[:1] != (node,):
        return False
    if user.op == "call_function":
        return user.target in ELEMENTWISE_FUNCTIONS and user.target is not operator.getitem
    return user.op == "call_method" and user.target in ELEMENTWISE_METHODS


def _check_plain_conv(layer_name: str, producer: nn.Module) -> None:
    if isinstance(producer, nn.Conv1d | nn.Conv2d) and (
        producer.groups != 1 or producer.padding_mode != "zeros"
    ):
        raise ConfigurationError(
            f"cannot widen {layer_name!r}: a grouped or non-zero-padded convolution "
            f"(groups={producer.groups}, padding_mode={producer.padding_mode!r}) cannot be widened"
        )


def _out_units(producer: nn.Module) -> int:
    if isinstance(producer, nn.Linear):
        return producer.out_features
    assert isinstance(producer, nn.Conv1d | nn.Conv2d)
    return producer.out_channels


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return repr(str(node.target))
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    return node.op
