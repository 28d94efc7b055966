"""Builders: a run config turned into the run's objects (dataset, wrapped host, optimizer).

Classes take flat typed arguments; these functions read the config sections and call them, so
the run loop (:mod:`esper.tolaria.trainer`) and its preflight check (:mod:`esper.tolaria.preflight`)
build the same things the same way.
"""

from __future__ import annotations

from typing import Any

import torch

from esper.core import MorphableModel, wrap
from esper.tasks.datasets import TensorSplit, hold_out_validation, load_dataset
from esper.tasks.hosts import build_host
from esper.tolaria.config import RunConfig, TrainSection


def build_data(config: RunConfig) -> tuple[TensorSplit, torch.Tensor, torch.Tensor]:
    """The run's dataset, with ``data.validation_fraction`` of the training examples held out
    (returned as ``(split, x_val, y_val)``) for the growth executor's evaluations."""
    options = config.data.model_dump(exclude={"name", "batch_size", "validation_fraction"})
    split = load_dataset(config.data.name, seed=config.run.seed, **options)
    return hold_out_validation(split, config.data.validation_fraction, seed=config.run.seed)


def build_model(config: RunConfig, data: TensorSplit, **wrap_options: Any) -> MorphableModel:
    """The host for ``data``, initialised from ``run.seed`` and wrapped with dormant seeds."""
    torch.manual_seed(config.run.seed)
    host = build_host(
        config.host.kind,
        in_features=data.num_features,
        out_features=data.num_outputs,
        input_shape=data.input_shape,
        options=config.host.model_dump(exclude={"kind"}),
    )
    seeds = config.seeds
    targets = seeds.target if seeds.target is not None else _default_targets(config)
    return wrap(
        host,
        target_layers=targets,
        seeds_per_layer=seeds.per_layer,
        blend_steps=seeds.blend_steps,
        health_every=seeds.health_every,
        **wrap_options,
    )


def _default_targets(config: RunConfig) -> list[type[torch.nn.Module]]:
    if config.host.kind == "cnn":
        return [torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear]
    return [torch.nn.Linear]


def build_optimizer(train: TrainSection, model: MorphableModel) -> torch.optim.Optimizer:
    """The optimizer over the host's parameters; grafted kernels join it as their own groups."""
    params = list(model.parameters())
    optimizer: torch.optim.Optimizer
    if train.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay
        )
    elif train.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)
    model.attach_optimizer(optimizer, lr=train.kernel_lr or train.lr)
    return optimizer
