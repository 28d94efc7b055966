"""Optimizer state of a growing model: one parameter group per grafted kernel, tagged by seed,
and checkpoints that put every group's state back on the parameters it belongs to.

:func:`attach_optimizer` adds a group per graft (tagged ``esper_seed="<layer>:<seed>"``) and
drops it, with its state, when the kernel leaves. The groups are therefore in graft order. A
fresh ``esper.wrap`` + ``load_state_dict`` re-grafts the checkpoint's kernels in *model* order,
so a saved optimizer state loaded position by position would hand one kernel's Adam moments to
another (a shape error at the next step, or silent corruption when the shapes agree).
:func:`load_optimizer_state_dict` first puts the live groups in the saved order by their tags,
then checks that every saved state tensor fits its parameter; any mismatch raises
:class:`~esper.errors.ConfigurationError` before the optimizer changes. An optimizer attached with
:func:`attach_optimizer` gets the same treatment from its own ``optimizer.load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from esper.errors import ArgumentTypeError, ConfigurationError
from esper.execution.arguments import shown

SEED_GROUP_KEY = "esper_seed"
"""Parameter-group key holding the seed a kernel's group belongs to (``"<layer>:<seed>"``)."""

KernelListener = Callable[[str, int, nn.Module], None]
"""``listener(layer_name, seed_idx, kernel_module)``, called when a kernel joins or leaves."""


def seed_group_tag(layer_name: str, seed_idx: int) -> str:
    """The tag of the parameter group of seed ``seed_idx`` in layer ``layer_name``."""
    return f"{layer_name}:{seed_idx}"


def optimizer_group_tags(optimizer: torch.optim.Optimizer) -> list[str | None]:
    """Each parameter group's ``esper_seed`` tag (``None`` for base groups), in order."""
    return [group.get(SEED_GROUP_KEY) for group in optimizer.param_groups]


def check_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """``optimizer`` if it is a ``torch.optim.Optimizer``, else :class:`ArgumentTypeError`."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ArgumentTypeError(
            f"optimizer must be a torch.optim.Optimizer, got {shown(optimizer)} "
            f"({type(optimizer).__name__})"
        )
    return optimizer


def kernel_group_listeners(
    optimizer: torch.optim.Optimizer, group_options: Mapping[str, Any]
) -> tuple[KernelListener, KernelListener]:
    """``(on_graft, on_removal)``: add a tagged group per grafted kernel (with
    ``group_options`` such as ``lr``), remove it with its state when the kernel leaves; also make
    ``optimizer.load_state_dict`` match groups by tag (see the module docstring)."""
    check_optimizer(optimizer)
    reserved = {"params", SEED_GROUP_KEY} & set(group_options)
    if reserved:
        raise ConfigurationError(
            f"group options may not set {sorted(reserved)}: Esper fills them in for each kernel"
        )
    options = dict(group_options)

    def add_group(layer_name: str, seed_idx: int, module: nn.Module) -> None:
        params = [p for p in module.parameters() if p.requires_grad]
        tag = seed_group_tag(layer_name, seed_idx)
        optimizer.add_param_group({"params": params, SEED_GROUP_KEY: tag, **options})

    def remove_group(layer_name: str, seed_idx: int, module: nn.Module) -> None:
        tag = seed_group_tag(layer_name, seed_idx)
        for group in [g for g in optimizer.param_groups if g.get(SEED_GROUP_KEY) == tag]:
            for param in group["params"]:
                optimizer.state.pop(param, None)
            # by identity: list.remove compares groups with ==, i.e. their tensors elementwise
            optimizer.param_groups[:] = [g for g in optimizer.param_groups if g is not group]

    optimizer.register_load_state_dict_pre_hook(_match_groups_before_load)
    return add_group, remove_group


def _match_groups_before_load(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """``optimizer.load_state_dict`` pre-hook: order the live groups like the saved ones."""
    prepare_optimizer_for_state(optimizer, state_dict, group_tags=None)


def load_optimizer_state_dict(
    optimizer: torch.optim.Optimizer,
    state_dict: Mapping[str, Any],
    *,
    group_tags: Sequence[str | None] | None = None,
) -> None:
    """Load ``state_dict`` (from ``optimizer.state_dict()``) after the model's state was loaded.

    Args:
        optimizer: the optimizer of a freshly wrapped model whose ``load_state_dict`` re-grafted
            the kernels (their groups re-added by :func:`attach_optimizer`).
        state_dict: the saved optimizer state; its groups carry their ``esper_seed`` tags.
        group_tags: the saved groups' tags in order, if kept apart from ``state_dict``.

    Raises:
        ConfigurationError: the optimizer's groups are not the checkpoint's, or a saved state
            tensor does not fit its parameter; the optimizer is unchanged.
    """
    check_optimizer(optimizer)
    prepare_optimizer_for_state(optimizer, state_dict, group_tags=group_tags)
    optimizer.load_state_dict(dict(state_dict))


def prepare_optimizer_for_state(
    optimizer: torch.optim.Optimizer,
    state_dict: Mapping[str, Any],
    *,
    group_tags: Sequence[str | None] | None,
) -> None:
    """Put the optimizer's groups in the saved order and check the saved state fits them."""
    saved_groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
    saved_state = state_dict.get("state") if isinstance(state_dict, Mapping) else None
    if not isinstance(saved_groups, list) or not isinstance(saved_state, Mapping):
        raise ConfigurationError(
            "not an optimizer state dict: expected a mapping with 'state' and 'param_groups' "
            "(what optimizer.state_dict() returns)"
        )
    if group_tags is None:
        group_tags = [
            g.get(SEED_GROUP_KEY) if isinstance(g, Mapping) else None for g in saved_groups
        ]
    current = optimizer_group_tags(optimizer)
    if sorted(current, key=str) != sorted(group_tags, key=str):
        raise ConfigurationError(
            f"the optimizer's parameter groups {current} do not match the checkpoint's "
            f"{list(group_tags)}; load the model state (which re-grafts the kernels) into a model "
            "whose optimizer is attached with attach_optimizer() first"
        )
    remaining = list(optimizer.param_groups)
    ordered = []
    for tag in group_tags:
        index = next(i for i, group in enumerate(remaining) if group.get(SEED_GROUP_KEY) == tag)
        ordered.append(remaining.pop(index))
    _check_state_fits(ordered, saved_groups, saved_state)
    optimizer.param_groups[:] = ordered


def _check_state_fits(
    groups: Sequence[dict[str, Any]], saved_groups: Sequence[Any], saved_state: Mapping[Any, Any]
) -> None:
    """Every saved per-parameter tensor of a parameter's own rank has that parameter's shape."""
    for group, saved in zip(groups, saved_groups, strict=True):
        saved_ids = saved.get("params", []) if isinstance(saved, Mapping) else []
        tag = group.get(SEED_GROUP_KEY) or "base parameters"
        if len(saved_ids) != len(group["params"]):
            raise ConfigurationError(
                f"optimizer group {tag!r} has {len(group['params'])} parameters but the "
                f"checkpoint's has {len(saved_ids)}; the checkpoint belongs to another model"
            )
        for param, saved_id in zip(group["params"], saved_ids, strict=True):
            entry = saved_state.get(saved_id, {})
            for name, value in entry.items() if isinstance(entry, Mapping) else ():
                if (
                    isinstance(value, torch.Tensor)
                    and value.dim() == param.dim() > 0
                    and value.shape != param.shape
                ):
                    raise ConfigurationError(
                        f"optimizer state {name!r} of a parameter in group {tag!r} has shape "
                        f"{tuple(value.shape)} but the parameter has {tuple(param.shape)}; the "
                        "checkpoint's groups belong to other parameters"
                    )
