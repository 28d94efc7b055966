"""Fault handling in KasminaLayer: a failing seed contributes exactly zero, is retried with
backoff, and gives up after ``max_retries``; non-finite kernels are quarantined."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from esper.contracts import BlueprintSpec, SeedState
from esper.execution import KasminaLayer, KernelCache

AddArtifact = Callable[..., str]  # the conftest fixture: (target, spec, init_seed) -> kernel id
Graft = Callable[..., nn.Module]  # the conftest fixture: (layer, seed_idx, spec) -> kernel


def _read_health(layer: KasminaLayer, step: int = 0):  # type: ignore[no-untyped-def]
    return layer.health_signal(layer.health_tensor().tolist(), step=step, timestamp=0.0)


def test_a_raising_kernel_is_bypassed_retried_with_backoff_then_given_up(
    cache: KernelCache, add_artifact: AddArtifact, raising_spec: BlueprintSpec
) -> None:
    torch.manual_seed(0)
    layer = KasminaLayer(
        nn.Linear(8, 6),
        num_seeds=1,
        layer_name="fc1",
        max_retries=2,
        retry_backoff_steps=2,
        health_every=0,
    )
    layer.attach(cache)
    kernel_id = add_artifact(layer.target(), raising_spec)
    layer.request_kernel(0, kernel_id).result(timeout=30)
    x = torch.randn(4, 8)
    expected = layer.base(x)
    history: dict[int, tuple[SeedState, int, int]] = {}
    outputs_equal_base = []

    for step in range(1, 12):
        layer.advance(step)
        outputs_equal_base.append(torch.equal(layer(x), expected))
        slot = layer.seed_layout.slots[0]
        history[step] = (slot.state, slot.error_count, slot.retry_after_step)

    E, D = SeedState.ERROR_RECOVERY, SeedState.DORMANT
    assert all(outputs_equal_base)
    # Step 1: grafted and faulted (retry after 1 + 2); step 3: retry requested (LOADING);
    # step 4: grafted again, faulted (retry after 4 + 4); step 8 retry, step 9: third fault > 2.
    assert history[1] == (E, 1, 3)
    assert history[2] == (E, 1, 3)
    assert history[3] == (SeedState.LOADING, 1, 3)
    assert history[4] == (E, 2, 8)
    assert history[7] == (E, 2, 8)
    assert history[8] == (SeedState.LOADING, 2, 8)
    assert history[9][:2] == (D, 3)
    assert history[11][:2] == (D, 3)
    assert isinstance(layer.last_errors[0], RuntimeError)
    assert "exploded on purpose" in str(layer.last_errors[0])
    assert layer.kernel(0) is None
    assert layer.seed_layout.slots[0].kernel_id is None
    assert layer.seed_layout.lifecycle.tolist() == [int(D)]
    assert layer.seed_layout.error_count.tolist() == [3]
    # Every load after the first was a cache hit: retries never refetch.
    assert cache.stats().misses == 1
    assert cache.stats().hits == 2


def test_a_faulted_kernel_is_not_called_again_before_its_retry(
    cache: KernelCache, add_artifact: AddArtifact, raising_spec: BlueprintSpec
) -> None:
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=1, retry_backoff_steps=5, health_every=0)
    layer.attach(cache)
    layer.request_kernel(0, add_artifact(layer.target(), raising_spec)).result(timeout=30)
    layer.advance(1)
    x = torch.randn(2, 8)

    for step in range(2, 5):
        layer(x)
        layer(x)
        layer.advance(step)

    assert layer.seed_states == (SeedState.ERROR_RECOVERY,)
    assert layer.seed_layout.slots[0].error_count == 1


def test_a_raising_seed_does_not_stop_the_others(graft: Graft, raising_spec: BlueprintSpec) -> None:
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=2, health_every=0)
    healthy = graft(layer, 0)
    graft(layer, 1, raising_spec, perturb=False)
    layer.set_alpha(0, 0.5)
    layer.set_alpha(1, 1.0)
    x = torch.randn(3, 8, requires_grad=True)

    y = layer(x)
    y.sum().backward()

    assert torch.allclose(y, layer.base(x) + 0.5 * healthy(x), atol=1e-6)
    assert layer.seed_states == (SeedState.BLENDING, SeedState.ERROR_RECOVERY)
    assert all(p.grad is not None for p in healthy.parameters())


def test_a_new_kernel_in_a_seed_that_gave_up_gets_its_full_retries(
    cache: KernelCache, add_artifact: AddArtifact, raising_spec: BlueprintSpec
) -> None:
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=1, max_retries=1, health_every=0)
    layer.attach(cache)
    raising_id = add_artifact(layer.target(), raising_spec)
    x = torch.randn(2, 8)
    step = 0
    while layer.seed_layout.slots[0].error_count <= layer.max_retries:
        if layer.seed_states[0] is SeedState.DORMANT:
            layer.request_kernel(0, raising_id).result(timeout=30)
        step += 1
        layer.advance(step)
        layer(x)
    assert layer.seed_states == (SeedState.DORMANT,)

    # The controller later germinates another kernel in the same seed; it faults once.
    layer.request_kernel(0, raising_id).result(timeout=30)
    step += 1
    layer.advance(step)
    layer(x)

    assert layer.seed_states == (SeedState.ERROR_RECOVERY,)
    assert layer.seed_layout.slots[0].error_count == 1


@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_a_non_finite_kernel_contributes_exactly_zero_forward_and_backward(
    graft: Graft, poison: float
) -> None:
    torch.manual_seed(0)
    host = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=1, health_every=0)
    kernel = graft(layer, 0)
    layer.set_alpha(0, 1.0)
    with torch.no_grad():
        dict(kernel.named_parameters())["down.weight"].fill_(poison)
    x = torch.randn(4, 5)

    reference = nn.Sequential(*host, layer.base)
    expected = reference(x)
    expected.square().sum().backward()
    expected_grads = [p.grad.clone() for p in reference.parameters()]  # type: ignore[union-attr]
    reference.zero_grad()

    y = layer(host(x))
    y.square().sum().backward()

    assert torch.isfinite(y).all()
    assert torch.equal(y, expected)
    # The kernel reads the host's activations: its non-finite weights must not leak into the
    # host's gradients, or one optimizer step would destroy the host model.
    for p, g in zip(reference.parameters(), expected_grads, strict=True):
        assert torch.equal(p.grad, g)  # type: ignore[arg-type]


def test_a_non_finite_kernel_is_quarantined_when_telemetry_is_read(graft: Graft) -> None:
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=2, layer_name="fc1", health_every=0)
    healthy = graft(layer, 0)
    poisoned = graft(layer, 1)
    with torch.no_grad():
        for p in poisoned.parameters():
            p.fill_(math.nan)
    x = torch.randn(3, 8)
    layer(x)
    assert layer.seed_states == (SeedState.BLENDING, SeedState.BLENDING)  # no host read yet

    signal = _read_health(layer, step=5)

    assert layer.seed_states == (SeedState.BLENDING, SeedState.ERROR_RECOVERY)
    assert [s.nonfinite_output for s in signal.seeds] == [False, True]
    assert signal.seeds[1].error_count == 1
    assert isinstance(layer.last_errors[1], FloatingPointError)
    assert layer.kernel(0) is healthy
    # The next window starts clean.
    assert not any(s.nonfinite_output for s in _read_health(layer).seeds)
