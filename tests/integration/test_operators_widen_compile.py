"""torch.compile through a widen: at most one recompile per event, none during the α ramp."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

import esper
from esper.contracts import SeedState

pytestmark = pytest.mark.slow


def test_widen_recompiles_once_per_event_and_never_during_the_ramp() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 10))
    model = esper.wrap(plain, health_every=0)
    compiled = torch.compile(model)
    x = torch.randn(8, 32)
    compiled(x)

    graft = model.widen("0", 16, blend_steps=10)
    with torch.no_grad():
        graft.wrappers["3"].weight.normal_()  # so the ramp changes the output
    counters.clear()
    first = compiled(x)
    after_widen = counters["stats"]["unique_graphs"]
    assert after_widen <= 1
    outputs = []
    for _ in range(10):
        model.step()
        outputs.append(compiled(x))
    assert counters["stats"]["unique_graphs"] == after_widen  # the ramp recompiled nothing
    assert graft.state is SeedState.ACTIVE
    torch.testing.assert_close(outputs[-1], model(x))
    assert not torch.allclose(first, outputs[-1])

    counters.clear()
    model.widenings.fossilize("0")
    merged = compiled(x)
    assert counters["stats"]["unique_graphs"] <= 1
    torch.testing.assert_close(merged, outputs[-1], rtol=0, atol=1e-5)
