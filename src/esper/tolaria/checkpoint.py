"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a folder ``checkpoints/epoch-<k>/`` with two files, written to a temporary
folder and renamed into place (a crash never leaves half a checkpoint):

* ``tensors.pt`` — ``torch.save`` of tensors only: the morphed model's ``state_dict`` (grafted
  kernels included), the optimizer's ``state_dict``, torch's global RNG state and the data-order
  generator's state. It is read back with ``torch.load(weights_only=True)``: nothing is unpickled.
* ``state.json`` — the rest as plain JSON: loop counters, the metrics-log position, the order of
  the optimizer's parameter groups, Python's and NumPy's RNG states, and the growth state
  (controller, safety gates, executor, graft schedule). Tensors inside the growth state (a
  learned policy's weights) are moved to ``tensors.pt`` and referenced by key.

Restoring the optimizer needs care: a fresh ``esper.wrap`` + ``load_state_dict`` re-grafts the
kernels in model order, and :meth:`~esper.core.MorphableModel.attach_optimizer` adds one parameter
group per graft in that order, while the original run added them in graft-time order.
:func:`restore_optimizer` reorders the groups to the saved order before loading the state.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esper.core import MorphableModel
from esper.core.optimizer_state import load_optimizer_state_dict, optimizer_group_tags
from esper.errors import ConfigurationError


@dataclass
class Checkpoint:
    """What a checkpoint holds, in memory."""

    epoch: int
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    optimizer_groups: list[str | None]
    torch_rng: torch.Tensor
    data_rng: torch.Tensor
    python_rng: list[Any]
    numpy_rng: list[Any]
    metrics_position: int
    growth: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


TENSOR_REF = "__tensor__"
"""Key of the JSON object that stands for a tensor moved to ``tensors.pt``."""


def split_tensors(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Move every tensor out of a nested dict/list state (e.g. a policy's weights inside the
    controller's state) into a flat dict; each is replaced by ``{"__tensor__": key}``."""
    tensors: dict[str, torch.Tensor] = {}

    def visit(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = value
            return {TENSOR_REF: key}
        if isinstance(value, Mapping):
            return {str(k): visit(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [visit(v) for v in value]
        return value

    return visit(state), tensors


def join_tensors(state: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(state, Mapping):
        if set(state) == {TENSOR_REF}:
            return tensors[state[TENSOR_REF]]
        return {k: join_tensors(v, tensors) for k, v in state.items()}
    if isinstance(state, list):
        return [join_tensors(v, tensors) for v in state]
    return state


def capture(
    *,
    epoch: int,
    step: int,
    model: MorphableModel,
    optimizer: torch.optim.Optimizer,
    data_generator: torch.Generator,
    metrics_position: int,
    growth: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Snapshot the run's state (tensors are the live ones: save before training on)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return Checkpoint(
        epoch=epoch,
        step=step,
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        optimizer_groups=optimizer_group_tags(optimizer),
        torch_rng=torch.get_rng_state(),
        data_rng=data_generator.get_state(),
        python_rng=[version, list(internal), gauss],
        numpy_rng=[str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        metrics_position=metrics_position,
        growth=dict(growth or {}),
        extra=dict(extra or {}),
    )


def save_checkpoint(directory: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` to ``directory`` atomically; returns the folder."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    growth, growth_tensors = split_tensors(checkpoint.growth)
    tensors = {
        "model": checkpoint.model,
        "optimizer": checkpoint.optimizer,
        "torch_rng": checkpoint.torch_rng,
        "data_rng": checkpoint.data_rng,
        "growth": growth_tensors,
    }
    torch.save(tensors, tmp / "tensors.pt")
    state = {
        "epoch": checkpoint.epoch,
        "step": checkpoint.step,
        "optimizer_groups": checkpoint.optimizer_groups,
        "python_rng": checkpoint.python_rng,
        "numpy_rng": checkpoint.numpy_rng,
        "metrics_position": checkpoint.metrics_position,
        "growth": growth,
        "extra": checkpoint.extra,
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors with ``weights_only=True``).

    Raises:
        ConfigurationError: the folder is missing or incomplete.
    """
    directory = Path(directory)
    try:
        state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
        tensors = torch.load(directory / "tensors.pt", weights_only=True, map_location="cpu")
    except FileNotFoundError as exc:
        raise ConfigurationError(
            f"checkpoint {directory} is incomplete ({exc.filename} is missing); resume from an "
            "earlier epoch's checkpoint or start a new run"
        ) from None
    return Checkpoint(
        epoch=int(state["epoch"]),
        step=int(state["step"]),
        model=tensors["model"],
        optimizer=tensors["optimizer"],
        optimizer_groups=list(state["optimizer_groups"]),
        torch_rng=tensors["torch_rng"],
        data_rng=tensors["data_rng"],
        python_rng=state["python_rng"],
        numpy_rng=state["numpy_rng"],
        metrics_position=int(state["metrics_position"]),
        growth=join_tensors(state.get("growth", {}), tensors.get("growth", {})),
        extra=dict(state.get("extra", {})),
    )


def restore_optimizer(optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> None:
    """Load the optimizer state after the model's (which re-created the kernels' groups).

    The groups are first put in the saved order (matched by their ``esper_seed`` tags), so each
    saved group's moments land on the same parameters as in the original run.

    Raises:
        ConfigurationError: the optimizer's groups do not match the checkpoint's.
    """
    load_optimizer_state_dict(
        optimizer, checkpoint.optimizer, group_tags=checkpoint.optimizer_groups
    )


def restore_rng(checkpoint: Checkpoint, data_generator: torch.Generator) -> None:
    """Put torch's, Python's, NumPy's and the data order's random streams back."""
    torch.set_rng_state(checkpoint.torch_rng)
    data_generator.set_state(checkpoint.data_rng)
    version, internal, gauss = checkpoint.python_rng
    random.setstate((int(version), tuple(int(k) for k in internal), gauss))
    name, keys, pos, has_gauss, cached = checkpoint.numpy_rng
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
