"""Telemetry: health statistics accumulated on the device, read in one transfer per flush,
reset after reading, published to a sink; non-finite kernels are quarantined on read."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn

import esper
from esper.contracts import HealthSignal, LayerKind, SeedState
from esper.execution import InMemoryArtifactSource

Germinate = Callable[..., nn.Module]


class ListSink:
    """A real telemetry sink that keeps every batch it is given."""

    def __init__(self) -> None:
        self.batches: list[list[HealthSignal]] = []

    def publish(self, signals: Sequence[HealthSignal]) -> None:
        self.batches.append(list(signals))


class Probe(nn.Module):
    """A linear layer with real statistics, a dead linear layer, and a half-dead conv layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 6)
        self.dead = nn.Linear(6, 3)
        self.conv = nn.Conv2d(2, 4, 1)
        with torch.no_grad():
            self.dead.weight.zero_()
            self.dead.bias.fill_(-1.0)  # every output is -1: never positive
            self.conv.weight.zero_()
            self.conv.bias.copy_(torch.tensor([-1.0, 2.0, -3.0, 4.0]))  # channels 0, 2 dead

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.dead(self.fc(x))  # (N, 3)
        return h.sum() + self.conv(image).sum()


@pytest.fixture
def probe(source: InMemoryArtifactSource) -> esper.MorphableModel:
    return esper.wrap(Probe(), seeds_per_layer=2, kernel_source=source, health_every=1)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(5, 4), torch.randn(3, 2, 4, 4)


def test_one_signal_per_layer_with_the_statistics_of_the_base_output(
    probe: esper.MorphableModel,
) -> None:
    x, image = _inputs()
    probe.step()  # arms sampling: the next forward is recorded
    probe(x, image).backward()
    before = time.time()

    signals = probe.collect_telemetry()

    by_name = {s.layer_name: s for s in signals}
    assert [s.layer_name for s in signals] == ["fc", "dead", "conv"]
    assert all(s.samples == 1 and s.step == 1 for s in signals)
    assert all(before - 5 <= s.timestamp <= time.time() for s in signals)
    assert (by_name["fc"].layer_kind, by_name["conv"].layer_kind) == (
        LayerKind.LINEAR,
        LayerKind.CONV2D,
    )

    fc_out = probe.layer("fc").base(x)
    assert by_name["fc"].output_mean == pytest.approx(fc_out.mean().item(), abs=1e-6)
    assert by_name["fc"].output_std == pytest.approx(fc_out.std(unbiased=False).item(), rel=1e-4)
    never_positive = (fc_out <= 0).all(dim=0).float().mean().item()
    assert by_name["fc"].dead_fraction == pytest.approx(never_positive)

    dead = by_name["dead"]
    assert (dead.output_mean, dead.output_std, dead.dead_fraction) == (-1.0, 0.0, 1.0)

    conv = by_name["conv"]
    assert conv.dead_fraction == 0.5  # per channel over batch and space
    assert conv.output_mean == pytest.approx(0.5)
    assert conv.output_std == pytest.approx(math.sqrt((1 + 4 + 9 + 16) / 4 - 0.25), rel=1e-5)

    for name in ("fc", "dead", "conv"):
        grads = [p.grad for p in probe.layer(name).base.parameters()]
        expected = torch.cat([g.flatten() for g in grads]).norm().item()  # type: ignore[union-attr]
        assert by_name[name].grad_norm == pytest.approx(expected, rel=1e-5)
    assert all(len(s.seeds) == 2 for s in signals)
    assert all(seed.state is SeedState.DORMANT for s in signals for seed in s.seeds)


def test_accumulators_reset_after_reading(probe: esper.MorphableModel) -> None:
    x, image = _inputs()
    probe.step()
    probe(x, image)
    probe.collect_telemetry()

    second = probe.collect_telemetry()

    assert all(s.samples == 0 for s in second)
    assert all((s.output_mean, s.output_std, s.dead_fraction) == (0.0, 0.0, 0.0) for s in second)
    assert all(s.grad_norm is None for s in second)  # no backward ever ran
    for layer in probe.layers.values():
        assert int(layer.seed_layout.layer_health.abs().sum()) == 0
        assert int(layer.seed_layout.seed_health.abs().sum()) == 0


def test_only_one_forward_per_armed_step_is_recorded(source: InMemoryArtifactSource) -> None:
    model = esper.wrap(Probe(), kernel_source=source, health_every=2)
    x, image = _inputs()

    model.step()  # step 1: not a sampling step
    model(x, image)
    assert all(s.samples == 0 for s in model.collect_telemetry())
    model.step()  # step 2: sampling armed
    model(x, image)
    model(x, image)

    assert all(s.samples == 1 for s in model.collect_telemetry())


def test_health_every_0_records_nothing(source: InMemoryArtifactSource) -> None:
    model = esper.wrap(Probe(), kernel_source=source, health_every=0)
    x, image = _inputs()

    for _ in range(3):
        model.step()
        model(x, image)

    assert all(s.samples == 0 for s in model.collect_telemetry())


def test_a_telemetry_sink_receives_each_batch(source: InMemoryArtifactSource) -> None:
    sink = ListSink()
    model = esper.wrap(Probe(), kernel_source=source, telemetry_sink=sink, health_every=1)
    x, image = _inputs()
    model.step()
    model(x, image)

    first = model.collect_telemetry()
    second = model.collect_telemetry()

    assert sink.batches == [first, second]
    assert [s.layer_name for s in sink.batches[0]] == ["fc", "dead", "conv"]


def test_seed_health_reports_the_contribution_of_a_running_kernel(
    probe: esper.MorphableModel, germinate: Germinate
) -> None:
    kernel = germinate(probe, "fc", 1)
    probe.step()  # arms sampling (and ramps alpha: overridden below)
    probe.set_seed_alpha("fc", seed_idx=1, alpha=0.5)
    x, image = _inputs()
    probe(x, image)

    fc = probe.collect_telemetry()[0]

    seed = fc.seeds[1]
    expected_rms = (0.5 * kernel(x)).square().mean().sqrt().item()
    assert seed.state is SeedState.BLENDING
    assert seed.alpha == 0.5
    assert seed.kernel_id == probe.layer("fc").seed_layout.slots[1].kernel_id
    assert seed.contribution_rms == pytest.approx(expected_rms, rel=1e-5)
    assert expected_rms > 0
    assert not seed.nonfinite_output
    assert fc.seeds[0].contribution_rms == 0.0
    # The layer statistics still describe the base output, not the blended one.
    assert fc.output_mean == pytest.approx(probe.layer("fc").base(x).mean().item(), abs=1e-6)


def test_a_nan_kernel_is_invisible_in_the_output_and_quarantined_on_read(
    probe: esper.MorphableModel, germinate: Germinate
) -> None:
    kernel = germinate(probe, "fc", 0)
    with torch.no_grad():
        for p in kernel.parameters():
            p.fill_(math.nan)
    x, image = _inputs()
    plain = Probe()

    out = probe(x, image)
    out.backward()

    assert torch.isfinite(out)
    assert torch.equal(out, plain(x, image))
    assert all(torch.isfinite(p.grad).all() for p in probe.base_parameters())  # type: ignore[arg-type]
    assert probe.seed_state("fc", 0) is SeedState.BLENDING  # nothing was read on the host yet

    signals = probe.collect_telemetry()

    assert probe.seed_state("fc", 0) is SeedState.ERROR_RECOVERY
    assert signals[0].seeds[0].nonfinite_output
    assert signals[0].seeds[0].error_count == 1
    assert torch.equal(probe(x, image), plain(x, image))


def test_a_shared_layer_reports_once(source: InMemoryArtifactSource) -> None:
    shared = nn.Linear(3, 3)
    model = esper.wrap(nn.Sequential(shared, shared), kernel_source=source, health_every=1)
    model.step()
    model(torch.randn(2, 3))

    signals = model.collect_telemetry()

    assert [s.layer_name for s in signals] == ["0"]
    assert signals[0].samples == 1
