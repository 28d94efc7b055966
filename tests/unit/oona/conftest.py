"""Fixtures for Oona's unit tests: small valid contracts to publish."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from esper.contracts import (
    HealthSignal,
    KernelReady,
    KernelTarget,
    LayerKind,
)


def _kernel_ready(index: int) -> KernelReady:
    return KernelReady(
        kernel_id=f"{index:064x}",
        blueprint_id="b" * 64,
        target=KernelTarget(
            layer_kind=LayerKind.LINEAR,
            in_features=8,
            out_features=4,
            channel_dim=-1,
            spatial_dims=0,
        ),
        job_id=f"{index:032x}",
    )


def _health_signal(layer_name: str = "fc1", step: int = 10) -> HealthSignal:
    return HealthSignal(
        layer_name=layer_name,
        layer_kind=LayerKind.LINEAR,
        step=step,
        timestamp=1_700_000_000.0 + step,
        samples=4,
        output_mean=0.25,
        output_std=1.5,
        dead_fraction=0.125,
        grad_norm=0.5,
        seeds=(),  # seed health is Kasmina's business; Oona only carries it
    )


@pytest.fixture
def kernel_ready() -> Callable[[int], KernelReady]:
    """Factory of distinct, valid ``KernelReady`` messages (the index sets the kernel id)."""
    return _kernel_ready


@pytest.fixture
def health_signal() -> Callable[..., HealthSignal]:
    """Factory of valid ``HealthSignal`` values for one layer at one step."""
    return _health_signal
