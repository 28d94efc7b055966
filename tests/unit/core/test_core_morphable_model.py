"""MorphableModel: loading kernels (async and sync), the step boundary, optimizer integration,
fault handling through the model, and statistics."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest
import torch
from torch import nn

import esper
from esper.blueprints import create_artifact
from esper.contracts import BlueprintSpec, SeedState
from esper.errors import KernelLoadError, SeedIndexError, UnknownLayerError
from esper.execution import InMemoryArtifactSource

KernelFor = Callable[..., str]
Germinate = Callable[..., nn.Module]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )


@pytest.fixture
def model(source: InMemoryArtifactSource) -> esper.MorphableModel:
    return esper.wrap(
        _mlp(), seeds_per_layer=2, kernel_source=source, blend_steps=4, health_every=0
    )


def test_load_kernel_awaits_without_blocking_and_activates(
    model: esper.MorphableModel, kernel_for: KernelFor
) -> None:
    kernel_id = kernel_for(model, "2")

    kernel = asyncio.run(model.load_kernel("2", seed_idx=1, kernel_artifact_id=kernel_id))

    assert model.seed_state("2", 1) is SeedState.ACTIVE
    assert model.layer("2").kernel(1) is kernel
    assert model.layer("2").seed_layout.slots[1].alpha == 1.0


def test_load_kernel_for_training_grafts_at_alpha_zero(
    model: esper.MorphableModel, kernel_for: KernelFor
) -> None:
    kernel_id = kernel_for(model, "2")

    kernel = asyncio.run(
        model.load_kernel("2", seed_idx=1, kernel_artifact_id=kernel_id, activate=False)
    )

    assert model.seed_state("2", 1) is SeedState.BLENDING
    assert model.layer("2").kernel(1) is kernel
    assert model.layer("2").seed_layout.slots[1].kernel_id == kernel_id
    assert model.layer("2").seed_layout.slots[1].alpha == 0.0


def test_request_kernel_grafts_at_the_next_step_and_ramps(
    model: esper.MorphableModel, kernel_for: KernelFor
) -> None:
    future = model.request_kernel("0", seed_idx=0, kernel_artifact_id=kernel_for(model, "0"))
    future.result(timeout=30)
    assert model.seed_state("0", 0) is SeedState.LOADING

    seen = []
    for _ in range(6):
        model.step()
        seen.append((model.seed_state("0", 0), model.layer("0").seed_layout.slots[0].alpha))

    B, A = SeedState.BLENDING, SeedState.ACTIVE
    assert seen == [(B, 0.0), (B, 0.25), (B, 0.5), (B, 0.75), (A, 1.0), (A, 1.0)]
    assert model.global_step == 6
    assert int(model.morph_step) == 6


def test_optimizer_follows_grafts_and_removals(
    model: esper.MorphableModel, germinate: Germinate
) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.attach_optimizer(optimizer, lr=0.05)
    base_params = list(model.base_parameters())
    assert len(optimizer.param_groups) == 1

    kernel = germinate(model, "2", 1)
    model.set_seed_alpha("2", seed_idx=1, alpha=1.0)

    groups = optimizer.param_groups
    assert len(groups) == 2
    assert groups[1]["esper_seed"] == "2:1"
    assert groups[1]["lr"] == 0.05
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in kernel.parameters()]
    before = {n: p.detach().clone() for n, p in kernel.named_parameters()}
    x = torch.randn(5, 8)

    model(x).square().sum().backward()
    optimizer.step()

    for name, param in kernel.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert not torch.equal(param, before[name]), name
        assert param in optimizer.state
    assert len(optimizer.state) == len(base_params) + 2

    model.unload_kernel("2", seed_idx=1)

    assert len(optimizer.param_groups) == 1
    assert all(p not in optimizer.state for p in kernel.parameters())
    assert len(optimizer.state) == len(base_params)
    optimizer.zero_grad()
    model(x).square().sum().backward()
    optimizer.step()  # the optimizer still works after the removal


def test_listeners_hear_about_grafts_and_removals(
    model: esper.MorphableModel, germinate: Germinate
) -> None:
    events: list[tuple[str, str, int]] = []
    model.on_kernel_grafted(lambda name, seed, module: events.append(("grafted", name, seed)))
    model.on_kernel_removed(lambda name, seed, module: events.append(("removed", name, seed)))

    germinate(model, "4", 0)
    model.unload_kernel("4", seed_idx=0)

    assert events == [("grafted", "4", 0), ("removed", "4", 0)]


def test_base_and_kernel_parameters_are_separated_by_name(
    model: esper.MorphableModel, germinate: Germinate
) -> None:
    kernel = germinate(model, "0", 0)

    kernel_ids = {id(p) for p in kernel.parameters()}
    assert {id(p) for p in model.kernel_parameters()} == kernel_ids
    assert not kernel_ids & {id(p) for p in model.base_parameters()}
    assert sum(p.numel() for p in model.base_parameters()) == sum(
        p.numel() for p in _mlp().parameters()
    )
    assert all(".seeds." in n for n, p in model.named_parameters() if id(p) in kernel_ids)


def test_fossilize_through_the_model(model: esper.MorphableModel, germinate: Germinate) -> None:
    germinate(model, "2", 0)
    for _ in range(4):
        model.step()
    assert model.seed_state("2", 0) is SeedState.ACTIVE

    model.fossilize("2", seed_idx=0)

    assert model.seed_state("2", 0) is SeedState.FOSSILIZED
    assert model.layer("2").seed_states == (SeedState.FOSSILIZED, SeedState.DORMANT)


def test_unknown_layer_names_get_suggestions(model: esper.MorphableModel) -> None:
    with pytest.raises(UnknownLayerError, match="Did you mean '2'") as info:
        model.seed_state("22", 0)
    assert "Seeded layers: 0, 2, 4" in str(info.value)
    with pytest.raises(UnknownLayerError):
        model.unload_kernel("fc9", seed_idx=0)
    assert isinstance(info.value, LookupError)


def test_seed_index_out_of_range_through_the_model(model: esper.MorphableModel) -> None:
    with pytest.raises(SeedIndexError, match="has 2 seeds"):
        model.seed_state("0", 2)
    with pytest.raises(SeedIndexError):
        model.request_kernel("0", seed_idx=-1, kernel_artifact_id="0" * 64)
    assert model.layer("0").seed_states == (SeedState.DORMANT, SeedState.DORMANT)


def test_a_corrupt_artifact_fails_the_load_and_training_continues() -> None:
    class CorruptingSource:
        """Serves a real artifact with one byte flipped (a damaged blob store)."""

        def __init__(self, inner: InMemoryArtifactSource) -> None:
            self.inner = inner

        def fetch(self, kernel_id: str) -> bytes:
            data = bytearray(self.inner.fetch(kernel_id))
            data[len(data) // 2] ^= 0x10
            return bytes(data)

    inner = InMemoryArtifactSource()
    model = esper.wrap(_mlp(), seeds_per_layer=1, kernel_source=CorruptingSource(inner))
    data, meta = create_artifact(
        BlueprintSpec(family="lowrank_adapter", params={"rank": 2}), model.layer("2").target()
    )
    inner.add(data)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = torch.randn(4, 8), torch.randn(4, 4)

    with pytest.raises(KernelLoadError, match="DORMANT") as info:
        model.load_kernel_sync("2", seed_idx=0, kernel_artifact_id=meta.kernel_id)

    assert "integrity" in str(info.value)
    assert model.seed_state("2", 0) is SeedState.DORMANT
    assert model.layer("2").kernel(0) is None
    assert model.stats().cache is not None and model.stats().cache.load_failures == 1
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.mse_loss(model(x), target)
    loss.backward()
    optimizer.step()
    model.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert torch.isfinite(loss)


def test_a_missing_artifact_fails_the_async_load(model: esper.MorphableModel) -> None:
    with pytest.raises(KernelLoadError, match="not in this in-memory source"):
        asyncio.run(model.load_kernel("0", seed_idx=0, kernel_artifact_id="a" * 64))

    assert model.seed_state("0", 0) is SeedState.DORMANT


def test_a_kernel_for_another_geometry_is_refused_with_a_clear_error(
    model: esper.MorphableModel, kernel_for: KernelFor
) -> None:
    kernel_id = kernel_for(model, "0")  # built for Linear 8 -> 16

    with pytest.raises(KernelLoadError, match="built for linear 8->16") as info:
        model.load_kernel_sync("4", seed_idx=0, kernel_artifact_id=kernel_id)

    assert "needs linear 16->4" in str(info.value)
    assert model.seed_state("4", 0) is SeedState.DORMANT
    x = torch.randn(2, 8)
    assert torch.isfinite(model(x)).all()


def test_a_load_that_takes_too_long_is_abandoned(kernel_for: KernelFor) -> None:
    class StalledSource:
        def __init__(self) -> None:
            self.release = threading.Event()

        def fetch(self, kernel_id: str) -> bytes:
            self.release.wait(timeout=30)
            raise ConnectionError("storage unavailable")

    stalled = StalledSource()
    model = esper.wrap(_mlp(), seeds_per_layer=1, kernel_source=stalled)

    with pytest.raises(KernelLoadError, match=r"longer than 0\.05s"):
        model.load_kernel_sync("0", seed_idx=0, kernel_artifact_id="b" * 64, timeout=0.05)

    assert model.seed_state("0", 0) is SeedState.DORMANT
    stalled.release.set()
    model.kernel_cache.close()
    model.step()  # the late failure arrives after the seed moved on: nothing changes
    assert model.seed_state("0", 0) is SeedState.DORMANT


def test_stats_count_parameters_states_and_cache(
    model: esper.MorphableModel, germinate: Germinate
) -> None:
    germinate(model, "2", 0)
    germinate(model, "2", 1)

    stats = model.stats()

    assert [layer.layer_name for layer in stats.layers] == ["0", "2", "4"]
    assert stats.base_parameters == sum(p.numel() for p in _mlp().parameters())
    assert stats.kernel_parameters == 2 * (2 * 16 + 16 * 2)
    assert stats.total_parameters == stats.base_parameters + stats.kernel_parameters
    assert stats.seeds_by_state[SeedState.BLENDING] == 2
    assert stats.seeds_by_state[SeedState.DORMANT] == 4
    assert stats.cache is not None
    assert (stats.cache.misses, stats.cache.hits, stats.cache.entries) == (1, 1, 1)


def test_a_transient_kernel_fault_is_bypassed_and_recovers_on_retry(
    source: InMemoryArtifactSource, germinate: Germinate
) -> None:
    plain = _mlp()
    model = esper.wrap(
        _mlp(), seeds_per_layer=1, kernel_source=source, retry_backoff_steps=2, health_every=0
    )
    faulty = germinate(model, "2", 0, perturb=False)

    def fail(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("device-side assert (simulated)")

    faulty.forward = fail  # type: ignore[method-assign]  # this instance only: a transient fault
    x = torch.randn(3, 8)
    model.set_seed_alpha("2", seed_idx=0, alpha=1.0)

    out = model(x)
    out.sum().backward()  # the training step goes on

    assert torch.equal(out, plain(x))
    assert model.seed_state("2", 0) is SeedState.ERROR_RECOVERY
    assert model.layer("2").seed_layout.slots[0].retry_after_step == 2
    states = []
    for _ in range(3):
        model.step()
        states.append(model.seed_state("2", 0))

    # step 1: still backing off; step 2: reload requested; step 3: grafted again, fresh copy.
    assert states == [SeedState.ERROR_RECOVERY, SeedState.LOADING, SeedState.BLENDING]
    recovered = model.layer("2").kernel(0)
    assert recovered is not None and recovered is not faulty
    assert torch.equal(model(x), plain(x))  # a fresh zero-initialised kernel at alpha 0
    assert model.layer("2").seed_layout.slots[0].error_count == 1
