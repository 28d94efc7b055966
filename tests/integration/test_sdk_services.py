"""The SDK against real services: aliases on PostgreSQL, the design's snippet loading
``kernel-001`` from the shared Urza service named by ``ESPER_URZA_URL`` (an ``esper urza serve``
process over PostgreSQL), and ``wrap(..., telemetry="redis://…")`` publishing to Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import esper
from esper.blueprints import build_kernel, describe_artifact, encode_artifact
from esper.contracts import BlueprintSpec, HealthSignalBatch, KernelMetadata, Topic
from esper.oona import open_bus
from esper.urza import HttpUrza, ServiceProcess, open_storage_library
from esper.urza.errors import AliasConflictError

pytestmark = pytest.mark.services

TOKEN = "sdk-integration-token"


class Host(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer_name = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.layer_name(x))


def trained_kernel(layer: nn.Linear, *, seed: int = 1) -> tuple[bytes, KernelMetadata]:
    """A kernel for ``layer`` with non-zero weights (it changes the output once it runs)."""
    target = esper.wrap(nn.Sequential(layer), seeds_per_layer=1).layer("0").target()
    spec = BlueprintSpec(family="lowrank_adapter", params={"rank": 2})
    module = build_kernel(spec, target, init_seed=0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    data = encode_artifact(module, spec, target, init_seed=0)
    return data, describe_artifact(data)


@pytest.fixture
def service(postgres_url: str, tmp_path: Path) -> Iterator[ServiceProcess]:
    with ServiceProcess(
        metadata_url=postgres_url, blob_url=str(tmp_path / "blobs"), token=TOKEN
    ) as process:
        yield process


def test_aliases_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    library = open_storage_library(metadata_url=postgres_url, blob_url=str(tmp_path / "b"))
    try:
        ids = []
        for seed in (1, 2):
            data, metadata = trained_kernel(Host().layer_name, seed=seed)
            library.put_kernel(data, metadata)
            ids.append(metadata.kernel_id)
        library.tag_kernel("kernel-001", ids[0])
        with pytest.raises(AliasConflictError):
            library.tag_kernel("kernel-001", ids[1])
        library.tag_kernel("kernel-001", ids[1], move=True)
        assert library.resolve_kernel("kernel-001") == ids[1]
        assert library.resolve_kernel(ids[0][:12]) == ids[0]
    finally:
        library.close()


def test_the_snippet_loads_from_the_service_named_by_esper_urza_url(
    service: ServiceProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, metadata = trained_kernel(Host().layer_name)
    with HttpUrza(service.url, token=TOKEN) as remote:
        remote.put_kernel(data, metadata)
        remote.tag_kernel("kernel-001", metadata.kernel_id)
    monkeypatch.setenv("ESPER_URZA_URL", service.url)
    monkeypatch.setenv("ESPER_URZA_TOKEN", TOKEN)
    model = Host()
    input_tensor = torch.randn(4, 8)

    async def design() -> torch.Tensor:
        morphable_model = esper.wrap(model, seeds_per_layer=4)
        await morphable_model.load_kernel("layer_name", seed_idx=0, kernel_artifact_id="kernel-001")
        output = morphable_model(input_tensor)
        morphable_model.close()
        return output

    assert not torch.allclose(asyncio.run(design()), model(input_tensor), atol=1e-4)


def test_telemetry_by_url_reaches_redis(redis_url: str) -> None:
    prefix = f"esper-sdk-{uuid.uuid4().hex[:8]}"
    url = f"{redis_url}?stream_prefix={prefix}"
    reader = open_bus(url)
    subscription = reader.subscribe(Topic.TELEMETRY_HEALTH, group="tamiyo", consumer="c")
    model = esper.wrap(Host(), seeds_per_layer=2, telemetry=url, health_every=1)
    model.step()
    model(torch.randn(2, 8))

    signals = model.collect_telemetry()
    model.close()  # sends what is queued

    deliveries = subscription.poll(block_ms=5000)
    assert [d.decode(HealthSignalBatch).signals for d in deliveries] == [tuple(signals)]
    reader.close()
