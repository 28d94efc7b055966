"""Fixtures for Oona's unit tests: small valid contracts to publish."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import factories
from esper.contracts import HealthSignal, KernelReady


def _health_signal(layer_name: str = "fc1", step: int = 10) -> HealthSignal:
    return factories.health_signal(
        layer_name,
        step=step,
        timestamp=1_700_000_000.0 + step,
        output_mean=0.25,
        output_std=1.5,
        dead_fraction=0.125,
        grad_norm=0.5,  # no seeds: seed health is Kasmina's business; Oona only carries it
    )


@pytest.fixture
def kernel_ready() -> Callable[[int], KernelReady]:
    """Factory of distinct, valid ``KernelReady`` messages (the index sets the kernel id)."""
    return factories.kernel_ready


@pytest.fixture
def health_signal() -> Callable[..., HealthSignal]:
    """Factory of valid ``HealthSignal`` values for one layer at one step."""
    return _health_signal
