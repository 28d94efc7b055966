"""DEEPEN and checkpoints: a deepened model's state_dict (``weights_only``-loadable) reloads into
a fresh ``esper.wrap`` of the original host, which rebuilds the inserted blocks first; training
resumed from it repeats the uninterrupted run bit for bit."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch import nn

import esper
from deepen_hosts import GPT, AttributeMLP
from esper import SeedState
from esper.errors import StateDictError


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, 17, (4, 9), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def _train(
    model: esper.MorphableModel, optimizer: torch.optim.Optimizer, steps: range
) -> list[float]:
    losses = []
    for step in steps:
        x, y = _batch(step)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.step()
        losses.append(loss.item())
        for inserted in model.inserted_blocks:
            if inserted.state is SeedState.ACTIVE:
                model.fossilize_block(inserted.block_id)
    return losses


def _fresh(seed: int) -> tuple[esper.MorphableModel, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = esper.wrap(GPT(), seeds_per_layer=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.attach_optimizer(optimizer)
    return model, optimizer


def _round_trip(checkpoint: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=True)
    return loaded


@pytest.mark.parametrize("interrupt_at", [4, 8])  # blending / after fossilizing
def test_resume_into_a_fresh_wrap_of_the_host_repeats_the_uninterrupted_run(
    interrupt_at: int,
) -> None:
    model, optimizer = _fresh(0)
    _train(model, optimizer, range(2))
    model.deepen(into="blocks", index=1, init="copy", blend_steps=4)
    model.deepen(into="blocks", index=0, init="fresh", blend_steps=3)
    _train(model, optimizer, range(2, interrupt_at))
    checkpoint = _round_trip(
        {"model": model.state_dict(), "optimizer": model.optimizer_state_dict(optimizer)}
    )
    uninterrupted = _train(model, optimizer, range(interrupt_at, 12))

    resumed, resumed_optimizer = _fresh(1)  # other initial weights: all must come from the file
    resumed.load_state_dict(checkpoint["model"])
    resumed.load_optimizer_state_dict(resumed_optimizer, checkpoint["optimizer"])

    saved = sorted(checkpoint["model"]["deepen_log._extra_state"]["blocks"], key=lambda e: e["id"])
    assert [b.state.name for b in resumed.inserted_blocks] == [e["state"] for e in saved]
    assert _train(resumed, resumed_optimizer, range(interrupt_at, 12)) == uninterrupted
    assert list(resumed.state_dict()) == list(model.state_dict())
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name


def test_a_block_after_an_attribute_layer_round_trips() -> None:
    torch.manual_seed(0)
    model = esper.wrap(AttributeMLP(), seeds_per_layer=1)
    model.deepen(after="fc1", hidden=5, blend_steps=2)
    model.step()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    x = torch.randn(4, 6)
    expected = model(x)

    fresh = esper.wrap(AttributeMLP(), seeds_per_layer=1)
    fresh.load_state_dict(_round_trip(model.state_dict()))

    assert torch.equal(fresh(x), expected)
    assert fresh.inserted_blocks[0].block.fc1.out_features == 5
    assert list(fresh.model.fc1._modules) == ["0", "1"]


def test_a_model_that_never_deepened_keeps_its_state_dict_keys() -> None:
    model = esper.wrap(GPT(), seeds_per_layer=1)

    assert not [k for k in model.state_dict() if "deepen" in k]


def test_a_checkpoint_with_other_insertions_is_refused() -> None:
    model, _ = _fresh(0)
    model.deepen(into="blocks", index=1)
    checkpoint = model.state_dict()
    other, _ = _fresh(0)
    other.deepen(into="blocks", index=2)

    with pytest.raises(StateDictError, match=r"fresh esper\.wrap of the original host"):
        other.load_state_dict(checkpoint)


def test_a_malformed_deepen_log_is_refused_before_anything_changes() -> None:
    model, _ = _fresh(0)
    model.deepen(into="blocks", index=1)
    checkpoint = model.state_dict()
    checkpoint["deepen_log._extra_state"]["blocks"][0]["index"] = "one"
    fresh, _ = _fresh(0)
    keys = list(fresh.state_dict())

    with pytest.raises(StateDictError, match="malformed"):
        fresh.load_state_dict(checkpoint)

    assert list(fresh.state_dict()) == keys


def test_reloading_an_earlier_checkpoint_into_the_same_model_rewinds_the_ramp() -> None:
    model, _ = _fresh(0)
    inserted = model.deepen(into="blocks", index=1, init="copy", blend_steps=4)
    model.step()
    model.step()
    checkpoint = _round_trip(model.state_dict())
    x, _ = _batch(0)
    expected = model(x)
    model.step()
    model.step()  # ACTIVE now
    assert inserted.state is SeedState.ACTIVE

    model.load_state_dict(checkpoint)

    assert inserted.state is SeedState.BLENDING
    assert torch.equal(model(x), expected)
    model.step()
    assert inserted.module.alpha.item() == 0.75


def test_a_fossilized_checkpoint_is_refused_by_the_same_model_still_blending() -> None:
    model, _ = _fresh(0)
    inserted = model.deepen(into="blocks", index=1, blend_steps=1)
    blending = model.state_dict()
    model.step()
    model.fossilize_block(inserted.block_id)
    fossilized = _round_trip(model.state_dict())
    other, _ = _fresh(0)
    other.load_state_dict(blending)

    with pytest.raises(StateDictError, match="differ from this model's"):
        other.load_state_dict(fossilized)
