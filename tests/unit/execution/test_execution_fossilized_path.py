"""A fossilized kernel runs as a plain module (issue 13, goal 2): ``base(x) + alpha · kernel(u)``
with no guard and no statistics, while kernels on trial beside it stay guarded."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from esper.contracts import SeedState
from esper.execution import KasminaLayer

Graft = Callable[..., nn.Module]


def _fossilize(layer: KasminaLayer, seed_idx: int) -> None:
    layer.set_alpha(seed_idx, 1.0)
    layer.seed_layout.transition(seed_idx, SeedState.ACTIVE, where="test")
    layer.fossilize(seed_idx)


def test_a_layer_whose_kernels_are_all_fossilized_binds_the_plain_forward(graft: Graft) -> None:
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=2, health_every=0)
    kernel = graft(layer, 0)
    _fossilize(layer, 0)
    x = torch.randn(4, 8, requires_grad=True)

    y = layer(x)
    y.sum().backward()

    assert layer.forward.__func__ is KasminaLayer._forward_fossilized  # type: ignore[attr-defined]
    assert torch.equal(y, torch.addcmul(layer.base(x), kernel(x), layer.seed_layout.alpha[0]))
    assert all(p.grad is not None for p in kernel.parameters())
    # no guard, no statistics: the seed's accumulators are never touched
    assert torch.equal(
        layer.seed_layout.seed_health, torch.zeros_like(layer.seed_layout.seed_health)
    )


def test_a_fossilized_kernel_beside_one_on_trial_is_unguarded_and_the_other_guarded(
    graft: Graft,
) -> None:
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=2, health_every=0)
    kept = graft(layer, 0)
    _fossilize(layer, 0)
    poisoned = graft(layer, 1)
    layer.set_alpha(1, 1.0)
    with torch.no_grad():
        for p in poisoned.parameters():
            p.fill_(math.nan)
    x = torch.randn(3, 8)

    y = layer(x)

    assert layer.forward.__func__ is KasminaLayer._forward_morphed  # type: ignore[attr-defined]
    assert torch.equal(y, torch.addcmul(layer.base(x), kept(x), layer.seed_layout.alpha[0]))
    output_sums = layer.seed_layout.seed_health[:, 2]
    assert output_sums[0].item() == 0.0 and math.isnan(output_sums[1].item())
