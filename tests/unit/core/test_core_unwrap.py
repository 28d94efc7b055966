"""esper.unwrap: a plain model (no KasminaLayer left) computing what the morphed model computes;
linear low-rank kernels merge into Linear weights, other kernels become FrozenGrafts."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import esper
from esper.contracts import BlueprintSpec
from esper.core import FrozenGraft
from esper.execution import InMemoryArtifactSource, KasminaLayer

Germinate = Callable[..., nn.Module]

RESIDUAL = BlueprintSpec(family="residual_mlp", params={"hidden": 6})
CONV = BlueprintSpec(family="conv_adapter", params={"hidden": 3})


def _lowrank(bias: bool = False) -> BlueprintSpec:
    return BlueprintSpec(
        family="lowrank_adapter", params={"rank": 2, "activation": "identity", "bias": bias}
    )


def _no_kasmina(model: nn.Module) -> bool:
    return not any(isinstance(m, KasminaLayer) for m in model.modules())


@pytest.mark.parametrize("kernel_bias", [False, True])
@pytest.mark.parametrize("base_bias", [False, True])
def test_linear_kernels_merge_into_the_linear_weights(
    source: InMemoryArtifactSource, germinate: Germinate, kernel_bias: bool, base_bias: bool
) -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 16, bias=base_bias), nn.ReLU(), nn.Linear(16, 4))
    model = esper.wrap(plain, seeds_per_layer=2, kernel_source=source, blend_steps=2)
    germinate(model, "0", 0, _lowrank(kernel_bias))
    model.step()
    model.step()  # seed 0 ACTIVE at alpha 1
    germinate(model, "0", 1, _lowrank(kernel_bias))
    model.set_seed_alpha("0", seed_idx=1, alpha=0.25)
    x = torch.randn(5, 8)

    unwrapped = esper.unwrap(model)

    assert _no_kasmina(unwrapped)
    assert type(unwrapped[0]) is nn.Linear
    assert type(unwrapped[2]) is nn.Linear
    assert (unwrapped[0].bias is not None) is (base_bias or kernel_bias)
    assert sum(p.numel() for p in unwrapped.parameters()) == sum(
        p.numel() for p in plain.parameters()
    ) + (16 if kernel_bias and not base_bias else 0)
    assert torch.allclose(unwrapped(x), model(x), atol=1e-5)
    assert not torch.allclose(unwrapped(x), plain(x), atol=1e-3)


def test_non_linear_kernels_become_frozen_grafts(
    source: InMemoryArtifactSource, germinate: Germinate
) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.norm = nn.LayerNorm(4)
            self.fc = nn.Linear(4, 3)
            self.out = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x).flatten(2).transpose(1, 2)  # (N, H*W, 4)
            h = self.norm(h + self.attn(h, h, h)[0])
            return self.out(torch.relu(self.fc(h.mean(dim=1))))

    model = esper.wrap(Net(), seeds_per_layer=1, kernel_source=source)
    germinate(model, "conv", 0, CONV)
    germinate(model, "attn", 0, _lowrank())  # linear, but it reads the output: not mergeable
    germinate(model, "norm", 0, _lowrank())
    germinate(model, "fc", 0, RESIDUAL)
    for name in ("conv", "attn", "norm", "fc"):
        model.set_seed_alpha(name, seed_idx=0, alpha=0.75)
    x = torch.randn(2, 2, 4, 4)

    unwrapped = esper.unwrap(model)

    assert _no_kasmina(unwrapped)
    for name in ("conv", "attn", "norm", "fc"):
        graft = getattr(unwrapped, name)
        assert isinstance(graft, FrozenGraft), name
        assert graft.alphas.tolist() == [0.75]
        assert len(graft.kernels) == 1
    assert type(unwrapped.out) is nn.Linear  # dormant: the base module again
    assert torch.allclose(unwrapped(x), model(x), atol=1e-5)
    h = torch.randn(2, 5, 4)
    out, weights = unwrapped.attn(h, h, h)
    assert weights.shape == (2, 5, 5)  # the attention's tuple output is kept
    assert torch.allclose(out, model.layer("attn")(h, h, h)[0], atol=1e-6)


def test_a_dormant_model_unwraps_to_the_original_modules(source: InMemoryArtifactSource) -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.Flatten(), nn.Linear(12, 2))
    model = esper.wrap(plain, kernel_source=source)
    x = torch.randn(4, 2, 6)

    unwrapped = esper.unwrap(model)

    assert [type(m) for m in unwrapped] == [type(m) for m in plain]
    assert unwrapped.state_dict().keys() == plain.state_dict().keys()
    assert torch.equal(unwrapped.eval()(x), plain.eval()(x))


def test_unwrap_leaves_the_morphed_model_working(
    source: InMemoryArtifactSource, germinate: Germinate
) -> None:
    torch.manual_seed(0)
    model = esper.wrap(nn.Sequential(nn.Linear(8, 4)), kernel_source=source)
    germinate(model, "0", 0, _lowrank())
    model.set_seed_alpha("0", seed_idx=0, alpha=1.0)
    x = torch.randn(3, 8)
    before = model(x)
    base_weight = model.layer("0").base.weight.detach().clone()

    unwrapped = esper.unwrap(model)

    assert torch.equal(model(x), before)
    assert torch.equal(model.layer("0").base.weight, base_weight)
    assert unwrapped[0].weight.data_ptr() != model.layer("0").base.weight.data_ptr()
    assert isinstance(model.layer("0"), KasminaLayer)


def test_a_shared_layer_unwraps_to_one_module_at_every_site(
    source: InMemoryArtifactSource, germinate: Germinate
) -> None:
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    model = esper.wrap(nn.Sequential(shared, nn.Tanh(), shared), kernel_source=source)
    germinate(model, "0", 0, _lowrank())
    model.set_seed_alpha("0", seed_idx=0, alpha=1.0)
    x = torch.randn(3, 4)

    unwrapped = esper.unwrap(model)

    assert _no_kasmina(unwrapped)
    assert unwrapped[0] is unwrapped[2]
    assert torch.allclose(unwrapped(x), model(x), atol=1e-5)
