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

Loading validates both files before anything is restored (:func:`load_checkpoint`): ``state.json``
against :class:`CheckpointState` (a non-negative integer ``epoch`` matching the folder's name,
well-formed RNG states, ...), ``tensors.pt`` for its entries, their types and RNG states that torch
accepts. A damaged checkpoint raises :class:`DamagedCheckpointError` naming the file;
:func:`load_resume_checkpoint` then falls back to the latest intact one.

Restoring the optimizer needs care: a fresh ``esper.wrap`` + ``load_state_dict`` re-grafts the
kernels in model order, and :meth:`~esper.core.MorphableModel.attach_optimizer` adds one parameter
group per graft in that order, while the original run added them in graft-time order.
:func:`restore_optimizer` reorders the groups to the saved order before loading the state.
:func:`restore_run` is the one call a resumed run makes: model, optimizer, random streams,
growth state and metrics log put back where the checkpoint left them.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError

from esper.core import MorphableModel
from esper.core.optimizer_state import load_optimizer_state_dict, optimizer_group_tags
from esper.errors import ConfigurationError, EsperError
from esper.tolaria.bounded_input import clip
from esper.tolaria.metrics import MetricsLog
from esper.tolaria.run_folder import RunFolder

logger = logging.getLogger(__name__)


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


class DamagedCheckpointError(EsperError, ValueError):
    """A checkpoint file is missing, truncated, not valid, or edited into an impossible state."""


_Word = Annotated[StrictInt, Field(ge=0, lt=2**32)]
"""One 32-bit word of a Mersenne Twister state."""


class CheckpointState(BaseModel):
    """What ``state.json`` must hold (its types and ranges; RNG states are also tried out)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epoch: StrictInt = Field(ge=0)
    step: StrictInt = Field(ge=0)
    optimizer_groups: list[str | None]
    python_rng: tuple[
        StrictInt, Annotated[list[_Word], Field(min_length=625, max_length=625)], StrictFloat | None
    ]
    """``random.getstate()``: version, 624 state words and the position, cached gauss."""
    numpy_rng: tuple[
        Literal["MT19937"],
        Annotated[list[_Word], Field(min_length=624, max_length=624)],
        Annotated[StrictInt, Field(ge=0, le=624)],
        Literal[0, 1],
        StrictFloat | StrictInt,
    ]
    """``np.random.get_state()``: name, 624 state words, position, has-gauss flag, cached gauss."""
    metrics_position: StrictInt = Field(ge=0)
    growth: dict[str, Any] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)


TENSOR_ENTRIES = ("model", "optimizer", "torch_rng", "data_rng", "growth")
"""The entries of ``tensors.pt``."""


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Read and validate a checkpoint written by :func:`save_checkpoint` (tensors with
    ``weights_only=True``: nothing is unpickled).

    Raises:
        DamagedCheckpointError: a file is missing, truncated, empty, or holds values no run could
            have written (the message names the file and what is wrong with it).
    """
    directory = Path(directory)
    state = _read_state(directory / "state.json")
    if (expected := _folder_epoch(directory)) is not None and state.epoch != expected:
        raise DamagedCheckpointError(
            f"checkpoint {directory / 'state.json'} says epoch {state.epoch} but its folder is "
            f"epoch {expected}: the file was edited or moved"
        )
    tensors = _read_tensors(directory / "tensors.pt")
    try:
        growth = join_tensors(state.growth, tensors["growth"])
    except KeyError as exc:
        raise DamagedCheckpointError(
            f"checkpoint {directory / 'state.json'} refers to tensor {clip(str(exc))} that "
            f"{directory / 'tensors.pt'} does not hold"
        ) from None
    return Checkpoint(
        epoch=state.epoch,
        step=state.step,
        model=tensors["model"],
        optimizer=tensors["optimizer"],
        optimizer_groups=list(state.optimizer_groups),
        torch_rng=tensors["torch_rng"],
        data_rng=tensors["data_rng"],
        python_rng=[state.python_rng[0], list(state.python_rng[1]), state.python_rng[2]],
        numpy_rng=list(state.numpy_rng),
        metrics_position=state.metrics_position,
        growth=growth,
        extra=dict(state.extra),
    )


def _folder_epoch(directory: Path) -> int | None:
    """The epoch in a checkpoint folder's name (``epoch-0003`` -> 3), if it has one."""
    digits = directory.name.removeprefix("epoch-")
    return int(digits) if digits != directory.name and digits.isdigit() else None


def _read_state(path: Path) -> CheckpointState:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamagedCheckpointError(f"checkpoint file {path} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        problem = "empty" if path.stat().st_size == 0 else f"not JSON ({clip(str(exc))})"
        raise DamagedCheckpointError(f"checkpoint file {path} is {problem}") from None
    try:
        state = CheckpointState.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the file"
        raise DamagedCheckpointError(
            f"checkpoint file {path} is not valid: {clip(where, limit=40)}: "
            f"{clip(first['msg'], limit=120)}"
        ) from None
    try:  # try the RNG states out on private generators: what setstate would refuse later
        version, internal, gauss = state.python_rng
        random.Random().setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state.numpy_rng
        np.random.RandomState().set_state(
            (name, np.array(keys, dtype=np.uint32), pos, has_gauss, float(cached))
        )
    except (TypeError, ValueError) as exc:
        raise DamagedCheckpointError(
            f"checkpoint file {path} holds an invalid random-number state ({clip(str(exc))})"
        ) from None
    return state


def _read_tensors(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DamagedCheckpointError(f"checkpoint file {path} is missing")
    if path.stat().st_size == 0:
        raise DamagedCheckpointError(f"checkpoint file {path} is empty")
    try:
        tensors = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # truncated zip, foreign bytes, a refused (non-tensor) object, ...
        raise DamagedCheckpointError(
            f"checkpoint file {path} cannot be read (truncated or not a checkpoint: "
            f"{clip(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)})"
        ) from None
    if not isinstance(tensors, dict) or set(tensors) != set(TENSOR_ENTRIES):
        found = sorted(map(str, tensors)) if isinstance(tensors, dict) else type(tensors).__name__
        raise DamagedCheckpointError(
            f"checkpoint file {path} should hold {', '.join(TENSOR_ENTRIES)}; it holds "
            f"{clip(str(found))}"
        )
    problems = [
        name
        for name in ("model", "growth")
        if not isinstance(tensors[name], dict)
        or not all(isinstance(v, torch.Tensor) for v in tensors[name].values())
    ]
    optimizer = tensors["optimizer"]
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= set(optimizer):
        problems.append("optimizer")
    for name in ("torch_rng", "data_rng"):
        try:
            torch.Generator().set_state(tensors[name])
        except (TypeError, RuntimeError, ValueError):
            problems.append(name)
    if problems:
        raise DamagedCheckpointError(
            f"checkpoint file {path} has malformed entries: {', '.join(problems)}"
        )
    return tensors


def load_resume_checkpoint(
    folder: RunFolder, *, epoch: int | None = None
) -> tuple[Checkpoint | None, list[str]]:
    """The checkpoint ``--resume`` continues from, and a warning per damaged one skipped.

    Args:
        folder: the run folder.
        epoch: the epoch to resume from (``--epoch``); ``None``: the latest intact checkpoint.

    Returns:
        ``(checkpoint, warnings)``; ``checkpoint`` is ``None`` when the run has no checkpoint
        (it was stopped before its first epoch ended, and starts over).

    Raises:
        ConfigurationError: ``epoch`` has no checkpoint.
        DamagedCheckpointError: ``epoch``'s checkpoint is damaged, or every checkpoint is.
    """
    available = folder.checkpoints()
    if epoch is not None:
        chosen = [path for found, path in available if found == epoch]
        if not chosen:
            epochs = ", ".join(str(found) for found, _ in available) or "none"
            raise ConfigurationError(
                f"run {folder.path} has no checkpoint of epoch {epoch} (checkpoints: {epochs})"
            )
        return load_checkpoint(chosen[0]), []
    warnings: list[str] = []
    for found, path in reversed(available):
        try:
            checkpoint = load_checkpoint(path)
        except DamagedCheckpointError as exc:
            warnings.append(str(exc))
            logger.warning("%s", exc)
            continue
        if warnings:
            warnings.append(f"resuming from the latest intact checkpoint instead: epoch {found}")
        return checkpoint, warnings
    if warnings:
        raise DamagedCheckpointError(
            f"no intact checkpoint in {folder.checkpoints_dir}: {warnings[0]}"
            + (f" (and {len(warnings) - 1} more damaged)" if len(warnings) > 1 else "")
        )
    return None, []


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


class Restorable(Protocol):
    """State that goes into a checkpoint as JSON (the growth driver)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class ResumePoint:
    """Where a (possibly resumed) run continues from."""

    epoch: int
    """The last epoch trained (0: a new run, or one stopped before its first checkpoint)."""
    wall_seconds: float = 0.0
    """Wall time the run had spent before."""


def restore_run(
    checkpoint: Checkpoint | None,
    *,
    resumed: bool,
    model: MorphableModel,
    optimizer: torch.optim.Optimizer,
    data_generator: torch.Generator,
    metrics: MetricsLog,
    growth: Restorable | None = None,
) -> ResumePoint:
    """Put a run back where ``checkpoint`` left it: the model (a fresh wrap re-grafts the
    checkpoint's kernels, which re-adds their optimizer groups), the optimizer, torch's,
    Python's, NumPy's and the data order's random streams, the growth state, and the metrics
    log cut back to the checkpoint's position.

    Args:
        checkpoint: the checkpoint to continue from (``None``: start from the beginning).
        resumed: the run is a resumed one; without a checkpoint (it was stopped before its
            first), its metrics log is emptied: it starts over.
        model: the freshly built model.
        optimizer: its optimizer.
        data_generator: the generator of the data order.
        metrics: the run's metrics log.
        growth: the growth driver, if the run grows.

    Returns:
        The epoch to continue after, and the wall time spent before.
    """
    if checkpoint is None:
        if resumed:
            metrics.truncate(0)  # interrupted before its first checkpoint: start over
        return ResumePoint(epoch=0)
    model.load_state_dict(checkpoint.model)
    restore_optimizer(optimizer, checkpoint)
    restore_rng(checkpoint, data_generator)
    if growth is not None:
        growth.load_state_dict(checkpoint.growth)
    metrics.truncate(checkpoint.metrics_position)
    logger.info("resumed from epoch %d (step %d)", checkpoint.epoch, checkpoint.step)
    return ResumePoint(
        epoch=checkpoint.epoch, wall_seconds=float(checkpoint.extra.get("wall_seconds", 0.0))
    )
