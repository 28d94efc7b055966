"""torch.compile on a wrapped model: no graph breaks when dormant, no recompiles during a ramp."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

import esper
from esper.blueprints import create_artifact
from esper.contracts import BlueprintSpec, SeedState
from esper.execution import InMemoryArtifactSource

pytestmark = pytest.mark.slow


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def test_dormant_wrapped_mlp_compiles_without_graph_breaks() -> None:
    torch._dynamo.reset()
    model = esper.wrap(_mlp(), seeds_per_layer=4)
    explanation = torch._dynamo.explain(model)(torch.randn(8, 32))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_alpha_ramp_causes_no_recompilation() -> None:
    torch._dynamo.reset()
    plain = _mlp()
    source = InMemoryArtifactSource()
    model = esper.wrap(plain, kernel_source=source, blend_steps=10, health_every=0)
    compiled = torch.compile(model)
    x = torch.randn(8, 32)
    torch.testing.assert_close(compiled(x), plain(x), rtol=0, atol=1e-6)

    spec = BlueprintSpec(family="lowrank_adapter", params={"rank": 4})
    data, _ = create_artifact(spec, model.layer("2").target(), init_seed=0)
    kernel = model.load_kernel_sync("2", seed_idx=0, kernel_artifact_id=source.add(data))
    with torch.no_grad():
        kernel.up.weight.normal_()
    counters.clear()
    compiled(x)  # the germination: at most one recompile
    after_graft = counters["stats"]["unique_graphs"]
    assert after_graft <= 1

    outputs = []
    for _ in range(10):
        model.step()
        outputs.append(compiled(x))
    assert counters["stats"]["unique_graphs"] == after_graft  # the ramp recompiled nothing
    assert model.seed_state("2", 0) is SeedState.ACTIVE
    # and the compiled model really followed the ramp: its output equals the eager one
    torch.testing.assert_close(outputs[-1], model(x))
    assert not torch.allclose(outputs[0], outputs[-1])
