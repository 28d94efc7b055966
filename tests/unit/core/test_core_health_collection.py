"""Batched health collection (one fused gradient-norm pass, one cat, one transfer, one fused
reset) gives exactly the signals the per-layer computation gave, and quarantines the same seeds."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

import esper
from esper.contracts import HealthSignal, SeedState
from esper.execution import InMemoryArtifactSource


class Mixed(nn.Module):
    """Layers with two gradients, one (no bias), none (frozen), a norm and a conv."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc = nn.Linear(4, 6)
        self.nobias = nn.Linear(6, 6, bias=False)
        self.frozen = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.conv = nn.Conv2d(2, 3, 1)
        for p in self.frozen.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.frozen(torch.relu(self.nobias(self.fc(x)))))
        return h.square().mean() + self.conv(image).relu().mean()


def _per_layer_signals(model: esper.MorphableModel, step: int) -> list[HealthSignal]:
    """The collection as it was: each layer's own tensor, one cat, then each layer's signal."""
    layers = list(dict.fromkeys(model.layers.values()))
    flat = torch.cat([layer.health_tensor() for layer in layers]).tolist()
    signals, offset = [], 0
    for layer in layers:
        size = layer.health_tensor_size(layer.num_seeds)
        signals.append(layer.health_signal(flat[offset : offset + size], step=step, timestamp=0.0))
        offset += size
    return signals


def _without_time(signals: list[HealthSignal]) -> list[HealthSignal]:
    return [s.model_copy(update={"timestamp": 0.0}) for s in signals]


def _run(model: esper.MorphableModel, windows: int) -> None:
    torch.manual_seed(5)
    for _ in range(windows):
        model.step()
        out = model(torch.randn(7, 4), torch.randn(2, 2, 3, 3))
        out.backward()


def test_batched_collection_equals_the_per_layer_computation(
    source: InMemoryArtifactSource, germinate: Callable[..., nn.Module]
) -> None:
    batched = esper.wrap(Mixed(), seeds_per_layer=3, kernel_source=source, health_every=1)
    germinate(batched, "fc", 1)
    batched.set_seed_alpha("fc", seed_idx=1, alpha=0.5)
    reference = copy.deepcopy(batched)
    for _ in range(3):  # the reset between windows too
        _run(batched, 2)
        _run(reference, 2)
        got = _without_time(batched.collect_telemetry())
        expected = _per_layer_signals(reference, reference.global_step)
        assert got == expected
        assert [s.grad_norm is None for s in got] == [False, False, True, False, False]
        assert got[0].seeds[1].contribution_rms > 0


def test_a_nonfinite_kernel_is_quarantined_as_before(
    source: InMemoryArtifactSource, germinate: Callable[..., nn.Module]
) -> None:
    batched = esper.wrap(Mixed(), seeds_per_layer=2, kernel_source=source, health_every=1)
    kernel = germinate(batched, "nobias", 0)
    with torch.no_grad():
        for p in kernel.parameters():
            p.fill_(math.nan)
    reference = copy.deepcopy(batched)
    _run(batched, 1)
    _run(reference, 1)
    got = _without_time(batched.collect_telemetry())
    assert got == _per_layer_signals(reference, reference.global_step)
    assert batched.seed_state("nobias", 0) is SeedState.ERROR_RECOVERY
    assert got[1].seeds[0].nonfinite_output and got[1].seeds[0].error_count == 1
