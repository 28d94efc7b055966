"""Nothing done around a kernel can crash the host's forward (issue 9, item 1): an output the
blend cannot use, a health sample that fails, a nested tensor passed in by hand."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from esper.contracts import BlueprintSpec, SeedState
from esper.execution import KasminaLayer

Graft = Callable[..., nn.Module]


@pytest.mark.parametrize("as_tuple", [False, True], ids=["wrong_shape", "tuple"])
def test_a_kernel_output_the_blend_cannot_use_is_a_fault_not_a_crash(
    graft: Graft, misshapen_spec: BlueprintSpec, as_tuple: bool
) -> None:
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=2, layer_name="fc", health_every=1)
    healthy = graft(layer, 0)
    kernel = graft(layer, 1, misshapen_spec, perturb=False)
    kernel.as_tuple = as_tuple
    layer.advance(1)  # health sampling armed: the failing seed's statistics are skipped too
    layer.set_alpha(0, 1.0)
    layer.set_alpha(1, 1.0)
    x = torch.randn(4, 8, requires_grad=True)

    y = layer(x)
    y.sum().backward()

    assert torch.allclose(y, layer.base(x) + healthy(x), atol=1e-6)
    assert layer.seed_states == (SeedState.BLENDING, SeedState.ERROR_RECOVERY)
    assert all(p.grad is not None for p in healthy.parameters())


def test_a_nested_tensor_passed_in_by_hand_blends_each_sequence(graft: Graft) -> None:
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=1, health_every=1)
    kernel = graft(layer, 0)
    layer.advance(1)
    layer.set_alpha(0, 0.5)
    sequences = [torch.randn(3, 8), torch.randn(5, 8)]
    nested = torch.nested.as_nested_tensor(sequences, layout=torch.strided)

    with torch.no_grad():
        y = layer(nested)

    assert y.is_nested
    for piece, x in zip(y.unbind(), sequences, strict=True):
        assert torch.allclose(piece, layer.base(x) + 0.5 * kernel(x), atol=1e-6)
    assert layer.seed_states == (SeedState.BLENDING,)
    assert layer.health_tensor()[0].item() == 1.0  # the nested output was sampled once
