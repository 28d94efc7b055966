"""torch.compile and DEEPEN: an insertion costs at most one recompile, the alpha ramp none, and
the compiled model follows the ramp and the fossilize exactly like the eager one."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import esper
from deepen_hosts import GPT, sequential_mlp
from esper.operators import GrowingBlock

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("build", "arguments", "inputs"),
    [
        (GPT, {"into": "blocks", "index": 1, "init": "copy"}, lambda: torch.randint(0, 17, (2, 8))),
        (sequential_mlp, {"after": "1"}, lambda: torch.randn(4, 6)),
    ],
)
def test_deepen_recompiles_once_and_the_ramp_never(build, arguments, inputs) -> None:  # type: ignore[no-untyped-def]
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = esper.wrap(build(), seeds_per_layer=1, health_every=0)
    compiled = torch.compile(model)
    x = inputs()
    before = compiled(x)

    inserted = model.deepen(**arguments, blend_steps=5)
    if arguments.get("init") != "copy":
        with torch.no_grad():
            inserted.block.fc2.weight.normal_()  # so the ramp changes the output
    counters.clear()
    torch.testing.assert_close(compiled(x), before, rtol=0, atol=0)  # the event: <= 1 recompile
    after_event = counters["stats"]["unique_graphs"]
    assert after_event <= 1

    outputs = []
    for _ in range(5):
        model.step()
        outputs.append(compiled(x))
    assert counters["stats"]["unique_graphs"] == after_event  # the ramp recompiled nothing
    torch.testing.assert_close(outputs[-1], model(x), rtol=0, atol=1e-6)
    assert not torch.allclose(outputs[0], outputs[-1])

    model.fossilize_block(inserted.block_id)  # a second structural event: <= 1 recompile
    torch.testing.assert_close(compiled(x), outputs[-1], rtol=0, atol=1e-6)
    assert counters["stats"]["unique_graphs"] <= after_event + 1
    assert not any(isinstance(m, GrowingBlock) for m in model.modules())
