"""Invariant 7: seed states, alphas, kernel ids, grafted kernels and the step counter live in
``state_dict``, so a fresh wrap of the base model reproduces a morphed model; ``.to()`` moves all."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch
from torch import nn

import esper
from esper.contracts import BlueprintSpec, SeedState
from esper.execution import InMemoryArtifactSource

Germinate = Callable[..., nn.Module]
KernelFor = Callable[..., str]

RESIDUAL = BlueprintSpec(family="residual_mlp", params={"hidden": 6})
CONV = BlueprintSpec(family="conv_adapter", params={"hidden": 3})


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc1 = nn.Linear(4, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))  # (N, 4)
        return self.fc2(self.norm(torch.relu(self.fc1(h))))


def _wrap(source: InMemoryArtifactSource | None = None) -> esper.MorphableModel:
    return esper.wrap(Net(), seeds_per_layer=2, kernel_source=source, blend_steps=4)


def _morphed(source: InMemoryArtifactSource, germinate: Germinate) -> esper.MorphableModel:
    """ACTIVE in conv, FOSSILIZED in fc2, BLENDING at alpha 0.5 in fc1 and norm; trained a step."""
    model = _wrap(source)
    germinate(model, "conv", 1, CONV)
    germinate(model, "fc2", 0)
    for _ in range(4):
        model.step()
    model.fossilize("fc2", seed_idx=0)
    germinate(model, "fc1", 0, RESIDUAL)
    germinate(model, "norm", 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(3, 2, 5, 5)).square().sum().backward()
    optimizer.step()  # base weights now differ from a fresh Net()
    model.step()
    model.step()
    return model


def _round_trip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _seed_view(model: esper.MorphableModel) -> dict[str, list[tuple[object, ...]]]:
    return {
        name: [(s.state, s.alpha, s.kernel_id, s.blend_steps_done) for s in layer.seed_layout.slots]
        for name, layer in model.layers.items()
    }


def test_a_fresh_wrap_reproduces_the_morphed_model(
    source: InMemoryArtifactSource, germinate: Germinate
) -> None:
    model = _morphed(source, germinate)
    x = torch.randn(4, 2, 5, 5)

    restored = _wrap()  # no kernel source: the kernels come from the checkpoint alone
    result = restored.load_state_dict(_round_trip(model.state_dict()))

    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    assert torch.equal(restored(x), model(x))
    assert _seed_view(restored) == _seed_view(model)
    B, A, F, D = SeedState.BLENDING, SeedState.ACTIVE, SeedState.FOSSILIZED, SeedState.DORMANT
    assert restored.layer("conv").seed_states == (D, A)
    assert restored.layer("fc1").seed_states == (B, D)
    assert restored.layer("fc2").seed_states == (F, D)
    assert restored.layer("fc1").seed_layout.slots[0].alpha == 0.5
    assert restored.global_step == model.global_step == 6
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
    assert sum(p.numel() for p in restored.kernel_parameters()) == sum(
        p.numel() for p in model.kernel_parameters()
    )

    for _ in range(3):  # the ramps continue identically
        model.step()
        restored.step()
        assert torch.equal(restored(x), model(x))
    assert restored.layer("fc1").seed_states == (A, D)
    assert restored.global_step == 9


def test_restored_kernels_train(source: InMemoryArtifactSource, germinate: Germinate) -> None:
    model = _morphed(source, germinate)
    restored = _wrap()
    restored.load_state_dict(model.state_dict())
    kernels = list(restored.kernel_parameters())
    before = [p.detach().clone() for p in kernels]
    optimizer = torch.optim.SGD(kernels, lr=0.1)

    restored(torch.randn(3, 2, 5, 5)).square().sum().backward()
    optimizer.step()

    assert all(p.requires_grad for p in kernels)
    assert any(not torch.equal(p, b) for p, b in zip(kernels, before, strict=True))


def test_loading_a_checkpoint_with_fewer_kernels_removes_the_extra_ones(
    source: InMemoryArtifactSource, germinate: Germinate
) -> None:
    plain = _wrap()
    grown = _morphed(source, germinate)
    x = torch.randn(2, 2, 5, 5)

    grown.load_state_dict(plain.state_dict())

    assert all(s is SeedState.DORMANT for layer in grown.layers.values() for s in layer.seed_states)
    assert list(grown.kernel_parameters()) == []
    assert torch.equal(grown(x), plain(x))
    assert grown.global_step == 0


def test_a_seed_caught_loading_comes_back_dormant(
    source: InMemoryArtifactSource, kernel_for: KernelFor
) -> None:
    model = _wrap(source)
    future = model.request_kernel("fc1", seed_idx=1, kernel_artifact_id=kernel_for(model, "fc1"))
    future.result(timeout=30)
    assert model.seed_state("fc1", 1) is SeedState.LOADING

    restored = _wrap()
    restored.load_state_dict(model.state_dict())

    assert restored.seed_state("fc1", 1) is SeedState.DORMANT
    assert restored.layer("fc1").seed_layout.slots[1].kernel_id is None
    assert int(restored.layer("fc1").seed_layout.kernel_id.sum()) == 0


def test_to_float64_moves_buffers_and_kernels(
    source: InMemoryArtifactSource, germinate: Germinate
) -> None:
    model = _morphed(source, germinate)
    x = torch.randn(3, 2, 5, 5)
    expected = model(x)

    model.to(torch.float64)

    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert len(list(model.kernel_parameters())) > 0
    layer = model.layer("fc1")
    assert layer.seed_layout.alpha.dtype == torch.float64
    assert layer.seed_layout.lifecycle.dtype == torch.int8  # integer buffers keep their type
    assert layer.seed_layout.kernel_id.dtype == torch.uint8
    assert layer.target().dtype == "float64"
    y = model(x.double())
    assert y.dtype == torch.float64
    assert torch.allclose(y, expected.double(), atol=1e-5)
    # The blend is computed in float64 through and through.
    h = torch.randn(5, 4, dtype=torch.float64)
    kernel = layer.kernel(0)
    assert kernel is not None
    assert torch.allclose(layer(h), layer.base(h) + 0.5 * kernel(h), atol=1e-12, rtol=0)

    model.step()  # the ramp writes into the moved buffers
    assert layer.seed_layout.slots[0].alpha == 0.75
    assert float(layer.seed_layout.alpha[0]) == 0.75


def test_a_kernel_grafted_after_a_dtype_move_takes_the_new_dtype(
    source: InMemoryArtifactSource, germinate: Germinate
) -> None:
    model = _wrap(source).to(torch.float64)
    # The kernel is compiled for the layer's current (float64) geometry and grafted in float64.
    kernel = germinate(model, "fc1", 0, perturb=True)
    model.set_seed_alpha("fc1", seed_idx=0, alpha=1.0)
    h = torch.randn(2, 4, dtype=torch.float64)
    layer = model.layer("fc1")

    assert {p.dtype for p in kernel.parameters()} == {torch.float64}
    assert torch.allclose(layer(h), layer.base(h) + kernel(h), atol=1e-12, rtol=0)


@pytest.mark.parametrize("target_dtype", [torch.float64, torch.bfloat16])
def test_a_float32_artifact_is_grafted_in_the_layer_dtype(
    source: InMemoryArtifactSource, kernel_for: KernelFor, target_dtype: torch.dtype
) -> None:
    model = _wrap(source)
    kernel_id = kernel_for(model, "fc1")  # compiled while the model was float32
    model.to(target_dtype)

    kernel = model.load_kernel_sync("fc1", seed_idx=0, kernel_artifact_id=kernel_id)

    assert {p.dtype for p in kernel.parameters()} == {target_dtype}
    out = model(torch.randn(2, 2, 5, 5, dtype=target_dtype))
    assert out.dtype == target_dtype
