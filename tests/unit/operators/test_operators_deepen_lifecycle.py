"""DEEPEN lifecycle: alpha ramps with model.step(), ACTIVE computes block(x) exactly, fossilize
leaves an ordinary submodule (plain torch, the cost of a static network of that depth), cull
restores the host exactly, illegal transitions change nothing."""

from __future__ import annotations

import copy

import pytest
import torch

import esper
from deepen_hosts import GPT, AttributeMLP, sequential_mlp
from esper import SeedState
from esper.errors import IllegalTransitionError, UnknownLayerError
from esper.operators import GrowingBlock


def _tokens() -> torch.Tensor:
    return torch.randint(0, 17, (3, 8), generator=torch.Generator().manual_seed(0))


def test_alpha_ramps_over_blend_steps_then_the_block_is_active() -> None:
    model = esper.wrap(GPT(), seeds_per_layer=1)
    inserted = model.deepen(into="blocks", index=1, init="copy", blend_steps=4)
    growing = inserted.module
    assert isinstance(growing, GrowingBlock)

    alphas = []
    for _ in range(4):
        model.step()
        alphas.append(growing.alpha.item())

    assert alphas == [0.25, 0.5, 0.75, 1.0]
    assert inserted.state is SeedState.ACTIVE


def test_at_alpha_one_the_model_computes_block_of_x_exactly() -> None:
    torch.manual_seed(0)
    model = esper.wrap(GPT(), seeds_per_layer=1)
    inserted = model.deepen(into="blocks", index=1, init="copy", blend_steps=1)
    model.step()
    x = model.model.embed(_tokens()) + model.model.position[:8]
    x = model.model.blocks[0](x)

    assert torch.equal(model.model.blocks[1](x), inserted.block(x))


def test_fossilize_leaves_an_ordinary_submodule_equal_to_a_static_deeper_model() -> None:
    torch.manual_seed(0)
    model = esper.wrap(GPT(), seeds_per_layer=1)
    inserted = model.deepen(into="blocks", index=1, init="copy", blend_steps=2)
    for _ in range(2):
        model.step()
    before = model(_tokens())

    model.fossilize_block(inserted.block_id)

    assert torch.equal(model(_tokens()), before)
    assert not any(isinstance(m, GrowingBlock) for m in model.modules())
    plain = model.unwrap()
    assert not [m for m in plain.modules() if type(m).__module__.startswith("esper")]
    assert torch.equal(plain(_tokens()), before)
    static = GPT(depth=3)  # the same network built at depth 3 takes the grown weights as is
    static.load_state_dict(plain.state_dict())
    assert torch.equal(static(_tokens()), before)


def test_unwrap_while_blending_computes_the_blend() -> None:
    torch.manual_seed(0)
    model = esper.wrap(sequential_mlp(), seeds_per_layer=1)
    model.deepen(into="", index=3, init="copy", copy_from=2, blend_steps=4)
    model.step()
    x = torch.randn(5, 6)

    plain = model.unwrap()

    assert not [m for m in plain.modules() if type(m).__module__.startswith("esper")]
    assert torch.equal(plain(x), model(x))


def test_fossilizing_a_blending_block_is_refused_and_changes_nothing() -> None:
    model = esper.wrap(GPT(), seeds_per_layer=1)
    inserted = model.deepen(into="blocks", index=1)
    keys = list(model.state_dict())

    with pytest.raises(IllegalTransitionError, match="BLENDING -> FOSSILIZED"):
        model.fossilize_block(inserted.block_id)

    assert list(model.state_dict()) == keys
    assert inserted.state is SeedState.BLENDING


def test_a_fossilized_block_cannot_be_culled() -> None:
    model = esper.wrap(GPT(), seeds_per_layer=1)
    inserted = model.deepen(into="blocks", index=1, blend_steps=1)
    model.step()
    model.fossilize_block(inserted.block_id)

    with pytest.raises(IllegalTransitionError, match="FOSSILIZED -> DORMANT"):
        model.cull_block(inserted.block_id)


@pytest.mark.parametrize(
    ("build", "arguments", "inputs"),
    [
        (GPT, {"into": "blocks", "index": 1, "init": "copy"}, _tokens),
        (AttributeMLP, {"after": "fc1"}, lambda: torch.randn(4, 6)),
        (sequential_mlp, {"after": "1"}, lambda: torch.randn(4, 6)),
    ],
)
def test_cull_restores_the_host_exactly(build, arguments, inputs) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = esper.wrap(build(), seeds_per_layer=1)
    x = inputs()
    before = model(x)
    host = copy.deepcopy(model.state_dict())
    structure = repr(model.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.attach_optimizer(optimizer)
    inserted = model.deepen(**arguments, blend_steps=3)
    model.step()
    model.step()

    model.cull_block(inserted.block_id)

    assert repr(model.model) == structure
    restored = model.state_dict()
    assert list(restored) == list(host)
    assert all(torch.equal(restored[k], host[k]) for k in host if k != "morph_step")
    assert len(optimizer.param_groups) == 1
    assert model.inserted_blocks == []
    assert torch.equal(model(x), before)


def test_unknown_block_ids_are_named() -> None:
    model = esper.wrap(GPT(), seeds_per_layer=1)
    model.deepen(into="blocks", index=1)

    with pytest.raises(UnknownLayerError, match=r"no inserted block with id 5; live blocks: \[0\]"):
        model.cull_block(5)


def test_two_blocks_in_one_stack_and_one_after_a_layer_coexist() -> None:
    torch.manual_seed(0)
    model = esper.wrap(GPT(), seeds_per_layer=1)
    before = model(_tokens())

    first = model.deepen(into="blocks", index=2, init="copy")
    second = model.deepen(into="blocks", index=0, init="copy", copy_from=1)
    third = model.deepen(after="blocks.1.fc")

    assert [b.block_id for b in model.inserted_blocks] == [0, 1, 2]
    assert [type(b).__name__ for b in model.model.blocks] == [
        "GrowingBlock", "Block", "Block", "GrowingBlock"
    ]  # fmt: skip
    assert torch.equal(model(_tokens()), before)
    model.cull_block(second.block_id)
    model.cull_block(third.block_id)
    model.cull_block(first.block_id)
    assert torch.equal(model(_tokens()), before)


def test_bypass_judges_a_block_by_ablation_and_restores_its_alpha() -> None:
    torch.manual_seed(0)
    model = esper.wrap(GPT(), seeds_per_layer=1)
    host = model(_tokens())
    inserted = model.deepen(into="blocks", index=1, init="copy", blend_steps=2)
    model.step()
    with_block = model(_tokens())

    with model.bypass_block(inserted.block_id):
        bypassed = model(_tokens())

    assert torch.equal(bypassed, host)
    assert torch.equal(model(_tokens()), with_block)
    assert not torch.equal(with_block, host)
    model.step()
    model.fossilize_block(inserted.block_id)
    with pytest.raises(esper.errors.ConfigurationError, match="FOSSILIZED"):
        model.bypass_block(inserted.block_id).__enter__()
