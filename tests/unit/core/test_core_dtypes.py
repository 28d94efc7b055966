"""Seeds in float16, bfloat16, float64 and under ``torch.autocast`` (issue 9, item 2).

A kernel whose outputs are all finite must never be taken for a non-finite one because a sum
overflowed in a narrow dtype; health statistics accumulate in at least float32; alphas and the
other per-seed scalars follow the model's dtype, so a float64 model blends in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import esper
from esper.contracts import BlueprintSpec, SeedState
from esper.execution import InMemoryArtifactSource

Germinate = Callable[..., nn.Module]

RANK8 = BlueprintSpec(family="lowrank_adapter", params={"rank": 8})
FLOAT16_MAX = torch.finfo(torch.float16).max


def _host(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).to(dtype)


def _grown(
    source: InMemoryArtifactSource, germinate: Germinate, dtype: torch.dtype, alpha: float
) -> tuple[esper.MorphableModel, nn.Module]:
    model = esper.wrap(_host(dtype), kernel_source=source, health_every=1)
    kernel = germinate(model, "2", 0, RANK8)
    with torch.no_grad():  # every output positive: a float16 sum of a large batch overflows
        kernel.down.weight.fill_(0.05)
        kernel.up.weight.fill_(0.05)
    model.step()  # arms health sampling for the next forward
    model.set_seed_alpha("2", seed_idx=0, alpha=alpha)
    return model, kernel


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_a_finite_kernel_is_kept_in_every_dtype(
    source: InMemoryArtifactSource, germinate: Germinate, dtype: torch.dtype
) -> None:
    model, kernel = _grown(source, germinate, dtype, alpha=1.0)
    x = 8 * torch.randn(512, 64).to(dtype)  # ordinary activations, a large batch
    layer = model.layer("2")

    y = model(x)
    with torch.no_grad():
        h = model.model[1](model.model[0](x))
        k = kernel(h)
        expected = layer.base(h) + k
    if dtype == torch.float16:
        assert not torch.isfinite(k.sum())  # what a float16 reduction of this output gives
    signal = next(s for s in model.collect_telemetry() if s.layer_name == "2")

    assert torch.isfinite(k).all()
    assert torch.allclose(y.detach(), expected, rtol=1e-2, atol=1e-2)
    assert not torch.allclose(y.detach(), layer.base(h).detach(), atol=1e-1)  # it contributes
    assert model.seed_state("2", 0) is SeedState.BLENDING  # not quarantined
    assert not signal.seeds[0].nonfinite_output
    assert 0 < signal.seeds[0].contribution_rms < float("inf")
    assert 0 < signal.output_std < float("inf")
    assert layer.seed_layout.alpha.dtype == dtype
    assert layer.seed_layout.layer_health.dtype == _accumulator_dtype(dtype)
    assert layer.seed_layout.seed_health.dtype == _accumulator_dtype(dtype)


def test_a_float64_model_blends_in_float64(
    source: InMemoryArtifactSource, germinate: Germinate
) -> None:
    model, kernel = _grown(source, germinate, torch.float64, alpha=0.3)
    x = torch.randn(16, 64, dtype=torch.float64)

    with torch.no_grad():
        y = model(x)
        h = model.model[1](model.model[0](x))
        expected = model.layer("2").base(h) + 0.3 * kernel(h)

    assert model.layer("2").seed_layout.alpha[0].item() == 0.3  # exactly the float64 0.3
    assert torch.allclose(y, expected, rtol=1e-13, atol=1e-13)


def test_converting_a_wrapped_model_keeps_health_accumulators_wide(
    source: InMemoryArtifactSource, germinate: Germinate
) -> None:
    model, _ = _grown(source, germinate, torch.float32, alpha=1.0)
    model.half()
    layer = model.layer("2")
    x = 1200 * torch.randn(256, 64).half()

    model(x)
    signal = next(s for s in model.collect_telemetry() if s.layer_name == "2")

    assert layer.seed_layout.alpha.dtype == torch.float16
    assert layer.seed_layout.layer_health.dtype == torch.float32
    assert layer.seed_layout.seed_health.dtype == torch.float32
    assert signal.output_std**2 > FLOAT16_MAX  # would have overflowed a float16 accumulator
    assert signal.output_std < float("inf")
    assert model.seed_state("2", 0) is SeedState.BLENDING
    model.double()
    assert layer.seed_layout.alpha.dtype == torch.float64
    assert layer.seed_layout.seed_health.dtype == torch.float64


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_keeps_finite_kernels_and_the_host_output_dtype(
    source: InMemoryArtifactSource, germinate: Germinate, autocast_dtype: torch.dtype
) -> None:
    model, kernel = _grown(source, germinate, torch.float32, alpha=1.0)
    plain = _host()
    x = 8 * torch.randn(512, 64)

    with torch.autocast("cpu", dtype=autocast_dtype):
        y = model(x)
        expected_dtype = plain(x).dtype
        h = model.model[1](model.model[0](x))
        k = kernel(h)
        expected = model.layer("2").base(h) + k
    if autocast_dtype == torch.float16:
        assert not torch.isfinite(k.sum())  # what a float16 reduction of this output gives
    signal = next(s for s in model.collect_telemetry() if s.layer_name == "2")

    assert y.dtype == expected_dtype == autocast_dtype
    assert torch.allclose(y.float(), expected.float(), rtol=2e-2, atol=2e-1)
    assert model.seed_state("2", 0) is SeedState.BLENDING
    assert not signal.seeds[0].nonfinite_output
    y.float().square().mean().backward()  # the backward runs in autocast's dtypes too
    assert all(torch.isfinite(p.grad).all() for p in kernel.parameters())  # type: ignore[arg-type]
