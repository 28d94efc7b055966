"""Fixtures for the core unit tests: kernels compiled in-process into an in-memory source."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pytest
import torch
from torch import nn

from esper.blueprints import create_artifact
from esper.contracts import BlueprintSpec
from esper.core import MorphableModel
from esper.execution import InMemoryArtifactSource


@pytest.fixture
def source() -> InMemoryArtifactSource:
    return InMemoryArtifactSource()


@pytest.fixture
def kernel_for(source: InMemoryArtifactSource) -> Callable[..., str]:
    """``kernel_for(model, layer_name, spec=None, init_seed=0) -> kernel_id`` for that layer's
    geometry, stored in ``source`` (default spec: a rank-2 ``lowrank_adapter``)."""

    def compile_kernel(
        model: MorphableModel,
        layer_name: str,
        spec: BlueprintSpec | None = None,
        init_seed: int = 0,
    ) -> str:
        spec = spec or BlueprintSpec(family="lowrank_adapter", params={"rank": 2})
        data, _ = create_artifact(spec, model.layer(layer_name).target(), init_seed=init_seed)
        return source.add(data)

    return compile_kernel


@pytest.fixture
def germinate(kernel_for: Callable[..., str]) -> Callable[..., nn.Module]:
    """``germinate(model, layer_name, seed_idx, spec=None, perturb=True) -> kernel``.

    Loads a kernel synchronously (seed BLENDING at alpha 0). With ``perturb`` its weights are
    replaced by small random values so that it really contributes.
    """

    def do_germinate(
        model: MorphableModel,
        layer_name: str,
        seed_idx: int = 0,
        spec: BlueprintSpec | None = None,
        *,
        perturb: bool = True,
    ) -> nn.Module:
        kernel_id = kernel_for(model, layer_name, spec)
        kernel = model.load_kernel_sync(layer_name, seed_idx=seed_idx, kernel_artifact_id=kernel_id)
        if perturb:
            generator = torch.Generator().manual_seed(
                zlib.crc32(f"{layer_name}:{seed_idx}".encode())
            )
            with torch.no_grad():
                for p in kernel.parameters():
                    p.copy_(0.3 * torch.randn(p.shape, generator=generator).to(p.dtype))
        return kernel

    return do_germinate
