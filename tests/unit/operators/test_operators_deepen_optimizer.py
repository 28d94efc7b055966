"""DEEPEN and the optimizer: a new block's parameters join an attached optimizer in their own
group (tagged ``deepen:<id>``) with zero state, the old parameters keep their moments and step
counts, and training then matches a hand-made reference optimizer on the plain deeper network."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import esper
from deepen_hosts import GPT
from esper.core import SEED_GROUP_KEY

Factory = Callable[[list[dict[str, object]]], torch.optim.Optimizer]

OPTIMIZERS: dict[str, Factory] = {
    "adam": lambda groups: torch.optim.Adam(groups, lr=1e-2),
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1),
    "sgd-momentum": lambda groups: torch.optim.SGD(groups, lr=1e-2, momentum=0.9),
}


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, 17, (4, 9), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> float:
    x, y = _batch(step)
    loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def _plain_name(name: str) -> str:
    """``model.blocks.1.block.fc.base.weight`` -> ``blocks.1.fc.weight``."""
    name = name.removeprefix("model.")
    return name.replace(".base.", ".").replace(".block.", ".", 1)


def test_new_parameters_join_in_their_own_group_with_empty_state() -> None:
    torch.manual_seed(0)
    model = esper.wrap(GPT(), seeds_per_layer=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.attach_optimizer(optimizer, lr=5e-3)
    for step in range(3):
        _train_step(model, optimizer, step)
    old_state = {p: copy.deepcopy(s) for p, s in optimizer.state.items()}

    inserted = model.deepen(into="blocks", index=1, init="copy")

    assert [g.get(SEED_GROUP_KEY) for g in optimizer.param_groups] == [None, "deepen:0"]
    group = optimizer.param_groups[1]
    assert group["lr"] == 5e-3
    assert [id(p) for p in group["params"]] == [id(p) for p in inserted.block.parameters()]
    assert not any(p in optimizer.state for p in group["params"])
    _train_step(model, optimizer, 3)
    for param, state in old_state.items():  # old moments carried on, steps counted on
        assert optimizer.state[param]["step"].item() == state["step"].item() + 1
    assert {optimizer.state[p]["step"].item() for p in group["params"]} == {1.0}


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_training_after_deepen_matches_a_hand_made_reference(kind: str) -> None:
    torch.manual_seed(0)
    model = esper.wrap(GPT(), seeds_per_layer=1)
    optimizer = OPTIMIZERS[kind]([{"params": list(model.parameters())}])
    model.attach_optimizer(optimizer)
    for step in range(3):
        _train_step(model, optimizer, step)
    model.deepen(into="blocks", index=1, init="copy", blend_steps=1)
    model.step()  # alpha 1: the model is the plain 3-block network
    names = {id(p): _plain_name(n) for n, p in model.named_parameters()}

    reference = GPT(depth=3)
    reference.load_state_dict(model.unwrap().state_dict())
    by_name = dict(reference.named_parameters())
    groups = [
        {"params": [by_name[names[id(p)]] for p in group["params"]]}
        for group in optimizer.param_groups
    ]
    reference_optimizer = OPTIMIZERS[kind](groups)  # type: ignore[arg-type]
    for group in optimizer.param_groups:  # old state copied by hand, new parameters left empty
        for param in group["params"]:
            if param in optimizer.state:
                reference_optimizer.state[by_name[names[id(param)]]] = copy.deepcopy(
                    optimizer.state[param]
                )

    for step in range(3, 7):
        assert _train_step(model, optimizer, step) == _train_step(
            reference, reference_optimizer, step
        )
    for name, param in model.named_parameters():
        assert torch.equal(param, by_name[_plain_name(name)]), name
