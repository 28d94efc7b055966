"""Topology contracts: a model's seeded structure and training progress, for a remote controller."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from esper.contracts.base import Contract
from esper.contracts.bounds import (
    MAX_SEEDS_PER_LAYER,
    MAX_STEP,
    LayerName,
    Name,
    ParameterCount,
    Step,
)
from esper.contracts.kernels import KernelTarget

_MAX_LAYERS = 100_000
_LayerIndex = Annotated[int, Field(ge=0, lt=_MAX_LAYERS)]


class LayerTopology(Contract):
    """One seeded layer, as a controller without the model sees it."""

    layer_name: LayerName
    target: KernelTarget
    base_parameters: ParameterCount
    num_seeds: int = Field(ge=1, le=MAX_SEEDS_PER_LAYER)


class ModelTopology(Contract):
    """The structure of a morphable model: its seeded layers and the data flow between them.

    Published once per run on ``telemetry.topology`` by the training side, so a controller in
    another process can build layer graphs without the model.
    """

    run_id: Name
    layers: tuple[LayerTopology, ...] = Field(max_length=_MAX_LAYERS)
    edges: tuple[tuple[_LayerIndex, _LayerIndex], ...] | None = Field(
        default=None,
        max_length=10 * _MAX_LAYERS,
        description="(source, destination) layer indices; None: module order",
    )
    traced: bool = False
    base_parameters: ParameterCount = Field(description="parameters of the whole host model")


class TrainingProgress(Contract):
    """Where a training run is: its step, recent loss and parameter counts.

    Published every few steps on ``telemetry.progress``.
    """

    run_id: Name
    step: Step
    total_steps: int | None = Field(default=None, ge=1, le=MAX_STEP)
    loss: float | None = Field(
        default=None,
        description="mean training loss of recent steps (a measurement: a diverged run's is NaN, "
        "which the controller ignores)",
    )
    base_parameters: ParameterCount
    kernel_parameters: ParameterCount
