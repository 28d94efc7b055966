"""esper.unwrap: a plain model (no KasminaLayer left) computing what the morphed model computes;
linear low-rank kernels merge into Linear weights (the other cases: test_core_unwrap_plain_torch)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import esper
from esper.contracts import BlueprintSpec
from esper.execution import InMemoryArtifactSource, KasminaLayer

Germinate = Callable[..., nn.Module]


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
