"""Block stacks: where DEEPEN can put a new block, and the container surgery that puts it there.

A new block goes into a *stack*: an ``nn.Sequential`` or an ``nn.ModuleList`` (a GPT's
``blocks``, an HF decoder's ``model.layers``), at an index. "After a layer" means the stack that
holds the layer, one past it; a layer that is a plain attribute of its parent (``self.fc1``) is
first wrapped in an ``nn.Sequential`` of itself so it has a stack to grow in (the wrap is undone
when the last block in it is culled).

Children of a stack with numeric keys (``"0"``, ``"1"``...) are renumbered, so a stack grown to
depth *n* has the keys of a stack built with *n* blocks; a named ``nn.Sequential`` (``fc0``,
``act0``...) keeps its names and the new block gets its own (``deepen<id>``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from torch import nn

from esper.errors import ConfigurationError, UnknownLayerError
from esper.execution import KasminaLayer

STACK_TYPES: tuple[type[nn.Module], ...] = (nn.Sequential, nn.ModuleList)
"""Containers a block can be inserted into."""


@dataclass(frozen=True)
class InsertionPoint:
    """A place for a new block: ``stack`` at ``index`` (the new block's index once inserted).

    ``wrapped`` is set when the stack is an ``nn.Sequential`` made for a plain attribute layer
    (``parent.<attribute>``) by :func:`stack_after`; nothing of the model has changed yet.
    """

    stack: nn.Module
    index: int
    wrapped: tuple[nn.Module, str] | None = None


def submodule(model: nn.Module, path: str, *, what: str) -> nn.Module:
    """``model.get_submodule(path)`` with an error that lists what exists."""
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name][:12]
        raise UnknownLayerError(
            f"{what} {path!r} is not a submodule of the model; submodules include: "
            f"{', '.join(names) or 'none'}"
        ) from None


def block_stacks(model: nn.Module) -> list[str]:
    """Dotted names of the model's stacks of two or more blocks of one class (where ``into=``
    usually points: ``blocks``, ``model.layers``, ``encoder.layers``)."""
    found = []
    for name, module in model.named_modules():
        children = [_plain(child) for child in children_of(module)]
        if isinstance(module, STACK_TYPES) and len(children) >= 2:
            composite = all(child is not None and any(child.children()) for child in children)
            if composite and len({type(child) for child in children}) == 1:
                found.append(name)
    return found


def stack_at(model: nn.Module, path: str, index: int) -> InsertionPoint:
    """The insertion point ``index`` (0 ... len) of the stack at ``path``."""
    stack = submodule(model, path, what="block stack")
    if not isinstance(stack, STACK_TYPES):
        raise ConfigurationError(
            f"{path!r} is a {type(stack).__name__}, not a block stack (nn.Sequential or "
            f"nn.ModuleList); block stacks of this model: {', '.join(block_stacks(model)) or 'none'}"
        )
    size = len(children_of(stack))
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= size:
        raise ConfigurationError(
            f"index must be an int from 0 to {size} (the stack {path!r} has {size} blocks), "
            f"got {index!r}"
        )
    return InsertionPoint(stack, index)


def stack_after(model: nn.Module, path: str) -> InsertionPoint:
    """The insertion point right after the module at ``path``."""
    layer = submodule(model, path, what="layer")
    parent_path, _, attribute = path.rpartition(".")
    parent = submodule(model, parent_path, what="parent")
    if isinstance(parent, STACK_TYPES):
        position = next(i for i, child in enumerate(children_of(parent)) if child is layer)
        return InsertionPoint(parent, position + 1)
    wrap = nn.Sequential(OrderedDict([("0", layer)]))
    return InsertionPoint(wrap, 1, wrapped=(parent, attribute))


def wrap_layer(model: nn.Module, path: str) -> tuple[nn.Module, tuple[nn.Module, str]]:
    """Wrap the plain attribute layer at ``path`` in an ``nn.Sequential`` of itself, now; returns
    the new stack and ``(parent, attribute)`` (used to rebuild a checkpoint's wraps)."""
    point = stack_after(model, path)
    if point.wrapped is None:
        raise ConfigurationError(f"{path!r} is already in a block stack; nothing to wrap")
    parent, attribute = point.wrapped
    setattr(parent, attribute, point.stack)
    return point.stack, point.wrapped


def insert(point: InsertionPoint, block: nn.Module, *, name: str) -> None:
    """Put ``block`` into ``point.stack`` at ``point.index`` (installing a wrap if any)."""
    if point.wrapped is not None:
        parent, attribute = point.wrapped
        setattr(parent, attribute, point.stack)
    children = list(point.stack._modules.items())
    children.insert(point.index, (name, block))
    _set_children(point.stack, children)


def remove(stack: nn.Module, block: nn.Module, *, wrapped: tuple[nn.Module, str] | None) -> None:
    """Take ``block`` out of ``stack``; undo the wrap if only the wrapped layer is left."""
    children = [(key, child) for key, child in stack._modules.items() if child is not block]
    _set_children(stack, children)
    if wrapped is not None and len(children) == 1:
        parent, attribute = wrapped
        setattr(parent, attribute, children[0][1])


def replace(stack: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` where ``old`` is in ``stack`` (same key)."""
    for key, child in stack._modules.items():
        if child is old:
            stack._modules[key] = new
            return
    raise ConfigurationError("the inserted block is no longer in its stack; was it moved?")


def index_in(stack: nn.Module, block: nn.Module) -> int:
    """Position of ``block`` in ``stack`` (by identity)."""
    for position, child in enumerate(stack._modules.values()):
        if child is block:
            return position
    raise ConfigurationError("the inserted block is no longer in its stack; was it moved?")


def children_of(stack: nn.Module) -> list[nn.Module]:
    """The children of ``stack``, in order."""
    return [child for child in stack._modules.values() if child is not None]


def _set_children(stack: nn.Module, children: list[tuple[str, nn.Module | None]]) -> None:
    numeric = all(key.isdigit() for key, _ in children if not key.startswith("deepen"))
    stack._modules.clear()
    for position, (key, child) in enumerate(children):
        stack._modules[str(position) if numeric else key] = child


def output_width(stack: nn.Module, index: int) -> tuple[nn.Module, int]:
    """The last Linear/Conv/norm at or before ``stack[index - 1]`` and the width it produces
    (a block after ``Linear -> act`` takes the Linear's ``out_features``)."""
    children = list(stack._modules.values())
    for child in reversed(children[:index]):
        layer = _plain(child)
        if isinstance(layer, nn.Linear):
            return layer, layer.out_features
        if isinstance(layer, nn.Conv1d | nn.Conv2d):
            return layer, layer.out_channels
        if isinstance(layer, nn.LayerNorm):
            return layer, layer.normalized_shape[-1]
        if isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d):
            return layer, layer.num_features
    raise ConfigurationError(
        "cannot tell the width of a new block here: no Linear, Conv1d/2d or norm precedes it in "
        "its stack; insert it after one of those layers"
    )


def _plain(module: nn.Module | None) -> nn.Module | None:
    """The base of a seeded layer, else ``module``."""
    return module.base if isinstance(module, KasminaLayer) else module
