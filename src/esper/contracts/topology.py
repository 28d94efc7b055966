"""Topology contracts: a model's seeded structure and training progress, for a remote controller."""

from __future__ import annotations

from pydantic import Field

from esper.contracts.base import Contract
from esper.contracts.kernels import KernelTarget


class LayerTopology(Contract):
    """One seeded layer, as a controller without the model sees it."""

    layer_name: str
    target: KernelTarget
    base_parameters: int = Field(ge=0)
    num_seeds: int = Field(ge=1)


class ModelTopology(Contract):
    """The structure of a morphable model: its seeded layers and the data flow between them.

    Published once per run on ``telemetry.topology`` by the training side, so a controller in
    another process can build layer graphs without the model.
    """

    run_id: str
    layers: tuple[LayerTopology, ...]
    edges: tuple[tuple[int, int], ...] | None = Field(
        default=None, description="(source, destination) layer indices; None: module order"
    )
    traced: bool = False
    base_parameters: int = Field(ge=0, description="parameters of the whole host model")


class TrainingProgress(Contract):
    """Where a training run is: its step, recent loss and parameter counts.

    Published every few steps on ``telemetry.progress``.
    """

    run_id: str
    step: int = Field(ge=0)
    total_steps: int | None = Field(default=None, ge=1)
    loss: float | None = Field(default=None, description="mean training loss of recent steps")
    base_parameters: int = Field(ge=0)
    kernel_parameters: int = Field(ge=0)
