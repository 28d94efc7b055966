"""Fixtures for the execution engine's unit tests: a real kernel cache over in-memory artifacts."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from esper.blueprints import create_artifact, family_names, register_family
from esper.contracts import BlueprintSpec, KernelTarget
from esper.execution import InMemoryArtifactSource, KasminaLayer, KernelCache

RAISING_FAMILY = "test_execution_raising_kernel"
"""A test-only blueprint family whose kernels raise in forward (the registry is global)."""


class RaisingKernel(nn.Module):
    """A real kernel module that always fails: stands in for a buggy blueprint builder."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("kernel exploded on purpose")


class _NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RaisingFamily:
    name = RAISING_FAMILY
    params_model = _NoParams

    def incompatibility(self, params: BaseModel, target: KernelTarget) -> str | None:
        return None

    def build(self, params: BaseModel, target: KernelTarget) -> nn.Module:
        return RaisingKernel(target.out_features)


if RAISING_FAMILY not in family_names():
    register_family(RaisingFamily())

MISSHAPEN_FAMILY = "test_execution_misshapen_kernel"
"""A test-only family whose kernels return what the blend cannot use (a wrong shape, a tuple)."""


class MisshapenKernel(nn.Module):
    """Runs fine, but returns ``(N, 1, 7)`` zeros, or a tuple once ``as_tuple`` is set."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(features))
        self.as_tuple = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.as_tuple:
            return (x, x)  # type: ignore[return-value]
        return x.new_zeros(x.shape[0], 1, 7)


class MisshapenFamily(RaisingFamily):
    name = MISSHAPEN_FAMILY

    def build(self, params: BaseModel, target: KernelTarget) -> nn.Module:
        return MisshapenKernel(target.out_features)


if MISSHAPEN_FAMILY not in family_names():
    register_family(MisshapenFamily())

LOWRANK = BlueprintSpec(family="lowrank_adapter", params={"rank": 2})


@pytest.fixture
def raising_spec() -> BlueprintSpec:
    """Spec of a kernel that raises in forward (a test-only family registered by this file)."""
    return BlueprintSpec(family=RAISING_FAMILY)


@pytest.fixture
def misshapen_spec() -> BlueprintSpec:
    """Spec of a kernel whose output does not fit the layer (a test-only family, see above)."""
    return BlueprintSpec(family=MISSHAPEN_FAMILY)


@pytest.fixture
def source() -> InMemoryArtifactSource:
    return InMemoryArtifactSource()


@pytest.fixture
def cache(source: InMemoryArtifactSource) -> Iterator[KernelCache]:
    cache = KernelCache(source)
    yield cache
    cache.close()


AddArtifact = Callable[..., str]


@pytest.fixture
def add_artifact(source: InMemoryArtifactSource) -> AddArtifact:
    """``add_artifact(target, spec=LOWRANK, init_seed=0) -> kernel_id``, stored in ``source``."""

    def add(target: KernelTarget, spec: BlueprintSpec = LOWRANK, init_seed: int = 0) -> str:
        data, _ = create_artifact(spec, target, init_seed=init_seed)
        return source.add(data)

    return add


Graft = Callable[..., nn.Module]


@pytest.fixture
def graft(cache: KernelCache, add_artifact: AddArtifact) -> Graft:
    """``graft(layer, seed_idx, spec=LOWRANK, perturb=True) -> kernel``: load and graft a kernel.

    The layer is attached to ``cache``; the seed ends BLENDING at alpha 0. With ``perturb`` the
    kernel's weights are set to non-zero values so it actually contributes.
    """

    def do_graft(
        layer: KasminaLayer,
        seed_idx: int,
        spec: BlueprintSpec = LOWRANK,
        *,
        perturb: bool = True,
        init_seed: int = 0,
    ) -> nn.Module:
        if layer._cache is None:
            layer.attach(cache)
        kernel_id = add_artifact(layer.target(), spec, init_seed)
        layer.request_kernel(seed_idx, kernel_id).result(timeout=30)
        assert layer.complete_load(seed_idx)
        kernel = layer.kernel(seed_idx)
        assert kernel is not None, layer.last_errors.get(seed_idx)
        if perturb:
            generator = torch.Generator().manual_seed(1000 + seed_idx)
            with torch.no_grad():
                for p in kernel.parameters():
                    p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        return kernel

    return do_graft
