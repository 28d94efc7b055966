"""DEEPEN at insertion: the model computes exactly what it did (train and eval, forward and
backward) for every architecture and both initialisations; fresh blocks are the identity even at
alpha 1, without a zeroed norm gain."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import esper
from deepen_hosts import GPT, AttributeMLP, conv_net, sequential_mlp

Case = tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], dict[str, object]]

CASES: dict[str, Case] = {
    "gpt-fresh": (GPT, lambda: torch.randint(0, 17, (3, 8)), {"into": "blocks", "index": 1}),
    "gpt-copy": (
        GPT, lambda: torch.randint(0, 17, (3, 8)),
        {"into": "blocks", "index": 2, "init": "copy"},
    ),
    "gpt-fresh-bottom": (GPT, lambda: torch.randint(0, 17, (3, 8)), {"into": "blocks", "index": 0}),
    "mlp-after-activation": (sequential_mlp, lambda: torch.randn(5, 6), {"after": "1"}),
    "mlp-after-linear": (sequential_mlp, lambda: torch.randn(5, 6), {"after": "2", "norm": True}),
    "mlp-attribute-layer": (AttributeMLP, lambda: torch.randn(5, 6), {"after": "fc1"}),
    "mlp-stack-copy": (
        sequential_mlp, lambda: torch.randn(5, 6),
        {"into": "", "index": 3, "init": "copy", "copy_from": 2},
    ),
    "cnn1d": (lambda: conv_net(1), lambda: torch.randn(4, 2, 9), {"after": "1"}),
    "cnn2d": (lambda: conv_net(2), lambda: torch.randn(4, 2, 5, 5), {"after": "2"}),
}  # fmt: skip


def _grads(model: nn.Module, x: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    model.zero_grad()
    model(x).float().pow(2).sum().backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_deepen_changes_nothing_at_insertion(case: str, mode: str) -> None:
    build, inputs, arguments = CASES[case]
    torch.manual_seed(0)
    model = esper.wrap(build(), seeds_per_layer=1)
    model.train(mode == "train")
    x = inputs()
    host_params = list(model.parameters())
    before = model(x)
    grads_before = _grads(model, x, host_params)

    inserted = model.deepen(**arguments)  # type: ignore[arg-type]
    model.train(mode == "train")
    after = model(x)
    grads_after = _grads(model, x, host_params)

    assert inserted.state is esper.SeedState.BLENDING
    assert (after - before).abs().max().item() == 0.0
    assert torch.equal(after, before)
    for g_before, g_after in zip(grads_before, grads_after, strict=True):
        assert torch.equal(g_before, g_after)
    assert any(p.grad is not None for p in inserted.block.parameters())


@pytest.mark.parametrize("case", [c for c in CASES if "copy" not in c])
def test_a_fresh_block_is_the_identity_even_at_alpha_one(case: str) -> None:
    build, inputs, arguments = CASES[case]
    torch.manual_seed(1)
    model = esper.wrap(build(), seeds_per_layer=1)
    x = inputs()
    before = model(x)

    inserted = model.deepen(**arguments, blend_steps=1)  # type: ignore[arg-type]
    model.step()

    assert inserted.state is esper.SeedState.ACTIVE
    assert torch.equal(model(x), before)


def test_a_fresh_stack_block_keeps_its_norm_gains_and_zeroes_only_output_projections() -> None:
    torch.manual_seed(0)
    model = esper.wrap(GPT(), seeds_per_layer=1)

    block = model.deepen(into="blocks", index=1).block

    assert torch.equal(block.ln1.weight, torch.ones(16))
    assert torch.equal(block.ln2.weight, torch.ones(16))
    assert not block.attn.out_proj.weight.any() and not block.c_proj.weight.any()
    assert block.attn.in_proj_weight.abs().sum() > 0 and block.fc.weight.abs().sum() > 0
    assert not torch.equal(block.fc.weight, model.model.blocks[0].fc.weight)  # re-initialised


def test_a_copied_block_is_a_plain_copy_of_its_source() -> None:
    torch.manual_seed(0)
    model = esper.wrap(GPT(depth=3), seeds_per_layer=1)

    block = model.deepen(into="blocks", index=1, init="copy", copy_from=2).block

    source = model.model.blocks[3]  # the source moved up by one
    assert {type(m).__module__ for m in block.modules()} <= {"deepen_hosts"} | {
        type(m).__module__ for m in nn.Sequential(nn.LayerNorm(1), nn.MultiheadAttention(2, 1),
                                                  nn.Linear(1, 1), nn.GELU()).modules()
    }  # fmt: skip
    assert torch.equal(block.fc.weight, source.fc.base.weight)
    assert block.fc.weight.data_ptr() != source.fc.base.weight.data_ptr()


def test_a_stack_of_numbered_blocks_is_renumbered_like_a_deeper_static_stack() -> None:
    model = esper.wrap(GPT(depth=2), seeds_per_layer=1)

    model.deepen(into="blocks", index=1)

    assert list(model.model.blocks._modules) == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "exactly one of after="),
        ({"after": "1", "into": "blocks"}, "exactly one of after="),
        ({"into": "blocks"}, "needs index="),
        ({"into": "blocks", "index": 5}, "index must be an int from 0 to 2"),
        ({"into": "embed", "index": 0}, "not a block stack"),
        ({"into": "nothing", "index": 0}, "not a submodule"),
        ({"into": "blocks", "index": 1, "init": "grow"}, "init must be"),
        ({"into": "blocks", "index": 1, "blend_steps": 0}, "blend_steps must be"),
        ({"into": "blocks", "index": 1, "copy_from": 7}, "copy_from must be from 0 to 1"),
        ({"after": "head", "init": "copy"}, "init='copy' are for into="),
        ({"into": "blocks", "index": 1, "output_projections": ["nope"]}, "output_projections"),
    ],
)
def test_bad_deepen_arguments_are_refused_with_the_fix_and_change_nothing(
    arguments: dict[str, object], message: str
) -> None:
    model = esper.wrap(GPT(), seeds_per_layer=1)
    keys = list(model.state_dict())

    with pytest.raises(esper.errors.EsperError, match=message):
        model.deepen(**arguments)  # type: ignore[arg-type]

    assert list(model.state_dict()) == keys
    assert model.inserted_blocks == []


def test_after_a_layer_with_no_width_before_it_says_where_to_insert() -> None:
    model = esper.wrap(nn.Sequential(nn.ReLU(), nn.Linear(3, 3)), seeds_per_layer=1)

    with pytest.raises(esper.errors.ConfigurationError, match="no Linear, Conv1d/2d or norm"):
        model.deepen(after="0")
