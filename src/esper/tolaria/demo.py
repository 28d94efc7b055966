"""The demo run: wrap a small MLP, train it on digits, germinate a seed mid-run, blend it in.

Run it with ``esper demo``. Everything is embedded (scikit-learn's digits, kernels compiled in
process into a local artifact folder); it finishes in seconds on 2 CPU cores.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from esper.blueprints import create_artifact
from esper.contracts import BlueprintSpec, CacheStats, LayerStats, SeedState
from esper.core import MorphableModel, wrap
from esper.errors import ConfigurationError
from esper.execution import DirectoryArtifactSource
from esper.tasks.datasets import TensorSplit, load_digits_split
from esper.tasks.evaluation import evaluate, task_loss
from esper.tasks.hosts import build_mlp

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of the demo: training loss, test accuracy and seed-state counts."""

    epoch: int
    train_loss: float
    test_accuracy: float
    seeds: str


@dataclass
class DemoResult:
    """What the demo measured."""

    epochs: list[EpochRecord] = field(default_factory=list)
    germinated_layer: str = ""
    germinated_at_epoch: int = 0
    kernel_id: str = ""
    blueprint: BlueprintSpec | None = None
    accuracy_before: float = 0.0
    accuracy_after: float = 0.0
    accuracy_static: float = 0.0
    """Final accuracy of the same host, same init and data order, trained without growth."""
    parameters_before: int = 0
    parameters_after: int = 0
    layers: tuple[LayerStats, ...] = ()
    cache: CacheStats | None = None
    wall_seconds: float = 0.0


def _accuracy(model: nn.Module, data: TensorSplit) -> float:
    return evaluate(model, data.x_test, data.y_test, regression=False)[1]


def seed_counts(seeds_by_state: Mapping[SeedState, int]) -> str:
    """``dormant 3, active 1``: the states that have seeds, in lifecycle order."""
    return ", ".join(f"{state.name.lower()} {n}" for state, n in seeds_by_state.items() if n)


def _seed_summary(model: MorphableModel) -> str:
    return seed_counts(model.stats().seeds_by_state)


def _host(data: TensorSplit, hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_mlp(data.num_features, data.num_classes, hidden=(hidden,))


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TensorSplit,
    order: torch.Tensor,
    batch_size: int,
    step_boundary: Callable[[], object],
) -> float:
    """One epoch over ``order``; returns the mean training loss (one host read per epoch)."""
    total_loss = torch.zeros(())
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        loss = task_loss(model(data.x_train[batch]), data.y_train[batch], regression=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_boundary()
        total_loss += loss.detach() * len(batch)
    return float(total_loss) / len(order)


def run_demo(
    *,
    epochs: int = 40,
    germinate_at_epoch: int = 20,
    hidden: int = 8,
    blueprint: BlueprintSpec | None = None,
    batch_size: int = 64,
    lr: float = 1e-2,
    seed: int = 0,
    artifact_dir: Path | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    threads: int = 1,
) -> DemoResult:
    """Train a 64-``hidden``-10 MLP on digits and grow its first layer at ``germinate_at_epoch``.

    The kernel is compiled in process for the layer's shape, written to a local artifact folder,
    and requested without blocking; it is grafted at the next step boundary, blends in over one
    epoch, trains with the host and is fossilized at the end. It runs on ``threads`` intra-op
    threads (``torch.set_num_threads``; 1, like a training run's default: tiny matrices gain
    nothing from more, and more slow down badly when the cores are shared).

    Raises:
        ConfigurationError: a size below 1, or a germination epoch outside ``1..epochs``.
    """
    if epochs < 1 or hidden < 1 or batch_size < 1 or threads < 1:
        raise ConfigurationError(
            "the demo needs epochs, hidden, batch_size and threads >= 1, got "
            f"{epochs}, {hidden}, {batch_size}, {threads}"
        )
    if not 1 <= germinate_at_epoch <= epochs:
        raise ConfigurationError(
            f"germinate_at_epoch {germinate_at_epoch} is outside the demo's epochs 1..{epochs}; "
            "germinate at an epoch the demo reaches (esper demo --germinate-at N, N <= --epochs)"
        )
    torch.set_num_threads(threads)
    started = time.perf_counter()
    data = load_digits_split(seed=seed)
    steps_per_epoch = -(-len(data.x_train) // batch_size)

    static = _host(data, hidden, seed)
    static_optimizer = torch.optim.Adam(static.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(data.x_train), generator=generator)
        _train_epoch(static, static_optimizer, data, order, batch_size, lambda: None)

    with tempfile.TemporaryDirectory() as scratch:
        source = DirectoryArtifactSource(artifact_dir or Path(scratch) / "artifacts")
        model = wrap(
            _host(data, hidden, seed),
            seeds_per_layer=2,
            kernel_source=source,
            blend_steps=steps_per_epoch,
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        model.attach_optimizer(optimizer, lr=lr)
        result = DemoResult(
            parameters_before=model.stats().total_parameters,
            accuracy_static=_accuracy(static, data),
        )
        spec = blueprint or BlueprintSpec(
            family="residual_mlp", params={"hidden": 32, "activation": "relu"}
        )
        layer_name = model.layer_names[0]
        generator = torch.Generator().manual_seed(seed)
        for epoch in range(1, epochs + 1):
            if epoch == germinate_at_epoch:
                result.accuracy_before = _accuracy(model, data)
                artifact, metadata = create_artifact(spec, model.layer(layer_name).target())
                source.add(artifact)
                model.request_kernel(layer_name, seed_idx=0, kernel_artifact_id=metadata.kernel_id)
                result.germinated_layer, result.germinated_at_epoch = layer_name, epoch
                result.kernel_id, result.blueprint = metadata.kernel_id, spec
                logger.info("germinating %s in %s at epoch %d", spec.family, layer_name, epoch)
            order = torch.randperm(len(data.x_train), generator=generator)
            loss = _train_epoch(model, optimizer, data, order, batch_size, model.step)
            record = EpochRecord(epoch, loss, _accuracy(model, data), _seed_summary(model))
            result.epochs.append(record)
            if on_epoch is not None:
                on_epoch(record)
        for layer in model.layers.values():
            for seed_idx, state in enumerate(layer.seed_states):
                if state is SeedState.ACTIVE:
                    layer.fossilize(seed_idx)
        stats = model.stats()
        result.accuracy_after = _accuracy(model, data)
        result.parameters_after = stats.total_parameters
        result.layers = stats.layers
        result.cache = stats.cache
        model.kernel_cache.close()
    result.wall_seconds = time.perf_counter() - started
    return result
