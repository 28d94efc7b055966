"""Unwrapping: the morphed model as a plain PyTorch model, with no class from Esper left in it.

Each seeded layer becomes its base module again, of its original class:

* no running kernel: the base module as it is;
* running kernels that compose exactly with the base (see :mod:`esper.core.weight_merge`): merged
  into the base's own weights;
* any other running kernels: kept as a ``torch.fx.GraphModule`` (a torch class) registered on
  the base as the child ``frozen_kernels`` and as its forward hook, computing the grafting
  formula ``y + Σ α_i · kernel_i(u)`` with the same operations (``torch.addcmul``) as the seeded
  layer. The base keeps its class, parameter names and attributes (``fc.weight``,
  ``attn.batch_first``...), PyTorch's fused encoder-layer path steps aside because a child has a
  hook, and ``nn.TransformerEncoder``'s nested-tensor path is turned off where such a layer
  lives (its nested tensors support no ``addcmul``).

Kernel modules are turned into torch classes by ``torch.fx.symbolic_trace`` (their forwards are
plain tensor code). The result pickles and loads where Esper is not installed.
"""

from __future__ import annotations

import copy
import inspect
import operator
from collections.abc import Sequence

import torch
from torch import fx, nn

from esper.core.layer_selection import replace_modules
from esper.core.weight_merge import merge_kernels
from esper.errors import ConfigurationError
from esper.execution import KasminaLayer
from esper.execution.layer_kinds import GraftPoint
from esper.operators.growing_block import GrowingBlock, plain_growing_block

FROZEN_KERNELS = "frozen_kernels"
"""Name of the child (and forward hook) that carries a layer's kept, unmergeable kernels."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` (a wrapped model's inner ``model``) computing what it computes
    now; ``model`` itself is not changed."""
    plain = copy.deepcopy(model)
    shared = shared_parameters(plain)
    replacements = {
        id(module): plain_layer(
            module, mergeable=not any(id(p) in shared for p in module.base.parameters())
        )
        for module in plain.modules()
        if isinstance(module, KasminaLayer)
    }
    replace_modules(plain, replacements)
    blocks = [m for m in plain.modules() if isinstance(m, GrowingBlock)]
    replace_modules(plain, {id(block): plain_growing_block(block) for block in blocks})
    for encoder in plain.modules():
        if isinstance(encoder, nn.TransformerEncoder) and any(
            FROZEN_KERNELS in m._modules for m in encoder.modules()
        ):
            encoder.use_nested_tensor = False
    leftovers = sorted(
        {type(m).__qualname__ for m in plain.modules() if _is_esper_machinery(type(m))}
    )
    if leftovers:
        raise ConfigurationError(
            f"unwrap() would leave Esper classes {leftovers} in the model; they are not "
            "traceable by torch.fx (a custom blueprint family's kernel?)"
        )
    return plain


def shared_parameters(model: nn.Module) -> set[int]:
    """``id`` of every parameter that more than one module holds (tied weights: GPT-2's
    ``lm_head.weight`` is ``wte.weight``); merging a kernel into one would change the other."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for parameter in module._parameters.values():
            if parameter is not None:
                owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    return {key for key, count in owners.items() if count > 1}


def _is_esper_machinery(kind: type) -> bool:
    """A class of Esper's own machinery (the task hosts of ``esper.tasks`` are plain models)."""
    return kind.__module__.startswith("esper") and not kind.__module__.startswith("esper.tasks")


def plain_layer(layer: KasminaLayer, *, mergeable: bool = True) -> nn.Module:
    """The plain module equivalent to ``layer`` in its current state (modifies ``layer.base``);
    kept kernels are merged into its weights only if ``mergeable`` (and the merge is exact)."""
    base = layer.base
    running = layer.seed_layout.running
    if not running:
        return base
    kernels = [module for i in running if (module := layer.kernel(i)) is not None]
    alphas = [layer.seed_layout.slots[i].alpha for i in running]
    if mergeable and merge_kernels(base, layer.profile, kernels, alphas):
        return base
    reads_input = layer.profile.graft_point is GraftPoint.INPUT
    frozen = frozen_kernels(
        [plain_torch(kernel) for kernel in kernels],
        [layer.seed_layout.alpha[i].clone() for i in running],
        input_name=_first_parameter(base) if reads_input else None,
        returns_tuple=layer.profile.returns_tuple,
    )
    base.add_module(FROZEN_KERNELS, frozen)
    base.register_forward_hook(frozen, with_kwargs=True)
    return base


def _first_parameter(module: nn.Module) -> str:
    """The name of the first argument of ``module.forward`` (``"input"`` for torch layers)."""
    return next(iter(inspect.signature(module.forward).parameters))


def plain_torch(module: nn.Module) -> nn.Module:
    """``module`` itself if every submodule is a torch (or user) class, else its fx trace."""
    if not any(type(m).__module__.startswith("esper") for m in module.modules()):
        return module
    traced = fx.symbolic_trace(module)
    for node in traced.graph.nodes:
        node.type = None  # postponed annotations are strings: the generated code would not pickle
    traced.recompile()
    return traced


def frozen_kernels(
    kernels: Sequence[nn.Module],
    alphas: Sequence[torch.Tensor],
    *,
    input_name: str | None,
    returns_tuple: bool,
) -> fx.GraphModule:
    """A forward hook ``(module, args, kwargs, output) -> output + Σ α_i · kernel_i(u)``.

    Args:
        kernels: the kept kernels, as torch modules.
        alphas: their blend weights (0-dim tensors in the model's dtype, kept as buffers).
        input_name: kernels read the layer's first argument, passed by position or by this
            keyword; ``None``: they read its output.
        returns_tuple: the layer returns ``(output, *extras)`` (MultiheadAttention).
    """
    root = nn.Module()
    graph = fx.Graph()
    graph.placeholder("module")
    args = graph.placeholder("args")
    kwargs = graph.placeholder("kwargs")
    output = graph.placeholder("output")
    y = graph.call_function(operator.getitem, (output, 0)) if returns_tuple else output
    if input_name is not None:  # (*args, kwargs.get(name))[0]: by position or by keyword
        by_keyword = graph.call_method("get", (kwargs, input_name))
        inputs = graph.call_function(operator.add, (args, (by_keyword,)))
        u = graph.call_function(operator.getitem, (inputs, 0))
    else:
        u = y
    for i, (kernel, alpha) in enumerate(zip(kernels, alphas, strict=True)):
        root.add_module(f"kernel_{i}", kernel)
        root.register_buffer(f"alpha_{i}", alpha)
        k = graph.call_module(f"kernel_{i}", (u,))
        dtype = graph.call_function(getattr, (y, "dtype"))
        scale = graph.call_method("to", (graph.get_attr(f"alpha_{i}"), dtype))
        y = graph.call_function(torch.addcmul, (y, k, scale))
    if returns_tuple:
        extras = graph.call_function(operator.getitem, (output, slice(1, None)))
        y = graph.call_function(operator.add, ((y,), extras))
    graph.output(y)
    return fx.GraphModule(root, graph, class_name="FrozenKernels")
