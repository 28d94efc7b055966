"""DEEPEN in an HF-style layer list (``model.layers``): layers called with keywords that return
tuples, RMSNorm, ``o_proj``/``down_proj`` output projections."""

from __future__ import annotations

import pytest
import torch

import esper
from deepen_hosts import LlamaStyle


def _ids() -> torch.Tensor:
    return torch.randint(0, 17, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("init", ["fresh", "copy"])
def test_deepen_an_hf_style_layer_list(init: str) -> None:
    torch.manual_seed(0)
    model = esper.wrap(LlamaStyle(), seeds_per_layer=1)
    before = model(_ids())

    inserted = model.deepen(into="model.layers", index=1, init=init, blend_steps=2)

    assert torch.equal(model(_ids()), before)
    block = inserted.block
    assert torch.equal(block.input_layernorm.weight, torch.ones(16))
    assert (init == "fresh") == (not block.o_proj.weight.any() and not block.down_proj.weight.any())
    model.step()
    model.step()
    if init == "fresh":
        assert torch.equal(model(_ids()), before)
    model.fossilize_block(inserted.block_id)
    grown = model(_ids())
    fresh = esper.wrap(LlamaStyle(), seeds_per_layer=1)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(_ids()), grown)
    static = LlamaStyle(depth=3)
    static.load_state_dict(model.unwrap().state_dict())
    assert torch.equal(static(_ids()), grown)


def test_the_layer_list_is_offered_when_into_is_missing() -> None:
    model = esper.wrap(LlamaStyle(), seeds_per_layer=1)

    with pytest.raises(
        esper.errors.ConfigurationError, match=r"stacks of this model: model\.layers"
    ):
        model.deepen(index=1)
