"""Checkpointing model + optimizer in a user's own loop (issue 9, item 4).

A fresh ``esper.wrap`` + ``load_state_dict`` re-grafts kernels in model order, not graft order;
the saved optimizer state must still land on the parameters it belongs to, and a checkpoint
that does not fit the optimizer must fail loudly without changing it.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch import nn

import esper
from esper.blueprints import create_artifact
from esper.contracts import BlueprintSpec
from esper.errors import ArgumentTypeError, ConfigurationError
from esper.execution import InMemoryArtifactSource

SPEC = BlueprintSpec(family="residual_mlp", params={"hidden": 8, "activation": "relu"})


def _fresh(source: InMemoryArtifactSource) -> tuple[esper.MorphableModel, torch.optim.Optimizer]:
    torch.manual_seed(0)
    host = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model = esper.wrap(host, seeds_per_layer=2, kernel_source=source, blend_steps=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.attach_optimizer(optimizer, lr=5e-3)
    return model, optimizer


def _train(
    model: esper.MorphableModel, optimizer: torch.optim.Optimizer, steps: int, seed: int
) -> None:
    data = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=data)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.step()


def _grow(
    source: InMemoryArtifactSource, spec: BlueprintSpec = SPEC
) -> tuple[esper.MorphableModel, torch.optim.Optimizer]:
    """Kernels grafted into layer "2" first, then "0": groups out of model order."""
    model, optimizer = _fresh(source)
    _train(model, optimizer, 3, seed=1)
    for layer in ("2", "0"):
        data, meta = create_artifact(spec, model.layer(layer).target())
        source.add(data)
        model.load_kernel_sync(layer, seed_idx=1, kernel_artifact_id=meta.kernel_id)
        _train(model, optimizer, 4, seed=2)
    return model, optimizer


def _round_trip(checkpoint: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _assert_same(first: esper.MorphableModel, second: esper.MorphableModel) -> None:
    one, two = first.state_dict(), second.state_dict()
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key]), key


def test_the_documented_checkpoint_resumes_bit_for_bit() -> None:
    source = InMemoryArtifactSource()
    model, optimizer = _grow(source)
    checkpoint = _round_trip(
        {"model": model.state_dict(), "optimizer": model.optimizer_state_dict(optimizer)}
    )
    _train(model, optimizer, 5, seed=3)  # the uninterrupted run goes on

    resumed, resumed_optimizer = _fresh(source)
    resumed.load_state_dict(checkpoint["model"])  # re-grafts "0" before "2"
    resumed.load_optimizer_state_dict(resumed_optimizer, checkpoint["optimizer"])
    _train(resumed, resumed_optimizer, 5, seed=3)

    _assert_same(resumed, model)
    assert [g.get("esper_seed") for g in resumed_optimizer.param_groups] == [None, "2:1", "0:1"]
    assert [g["lr"] for g in resumed_optimizer.param_groups] == [1e-2, 5e-3, 5e-3]


def test_a_plain_optimizer_load_state_dict_also_matches_groups_by_seed() -> None:
    source = InMemoryArtifactSource()
    model, optimizer = _grow(source)
    checkpoint = _round_trip({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    _train(model, optimizer, 5, seed=3)

    resumed, resumed_optimizer = _fresh(source)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])  # attached: seed-aware
    _train(resumed, resumed_optimizer, 5, seed=3)

    _assert_same(resumed, model)


def _snapshot(optimizer: torch.optim.Optimizer) -> tuple[list[Any], list[int]]:
    return (
        [(g.get("esper_seed"), [id(p) for p in g["params"]]) for g in optimizer.param_groups],
        sorted(id(p) for p in optimizer.state),
    )


@pytest.mark.parametrize("through", ["model", "optimizer"])
def test_a_checkpoint_whose_kernels_have_other_shapes_fails_loudly(through: str) -> None:
    source = InMemoryArtifactSource()
    _model, optimizer = _grow(source)
    saved = _round_trip({"optimizer": optimizer.state_dict()})["optimizer"]
    other_source = InMemoryArtifactSource()
    wider = BlueprintSpec(family="residual_mlp", params={"hidden": 12, "activation": "relu"})
    other, other_optimizer = _grow(other_source, wider)  # same seeds, other kernel shapes
    before = _snapshot(other_optimizer)

    with pytest.raises(ConfigurationError, match="has shape"):
        if through == "model":
            other.load_optimizer_state_dict(other_optimizer, saved)
        else:
            other_optimizer.load_state_dict(saved)

    assert _snapshot(other_optimizer) == before


def test_an_optimizer_without_the_checkpoints_kernel_groups_is_refused() -> None:
    source = InMemoryArtifactSource()
    model, optimizer = _grow(source)
    saved = optimizer.state_dict()
    _, fresh_optimizer = _fresh(source)  # the model state (and so the kernels) was not loaded

    with pytest.raises(ConfigurationError, match="do not match the checkpoint"):
        model.load_optimizer_state_dict(fresh_optimizer, saved)
    assert [g.get("esper_seed") for g in fresh_optimizer.param_groups] == [None]
    assert not fresh_optimizer.state


def test_bad_optimizer_arguments_are_refused() -> None:
    model, optimizer = _fresh(InMemoryArtifactSource())

    with pytest.raises(ConfigurationError, match="already attached"):
        model.attach_optimizer(optimizer)
    with pytest.raises(ArgumentTypeError, match=r"torch\.optim\.Optimizer"):
        model.attach_optimizer(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="group options may not set"):
        model.attach_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), params=[])
    with pytest.raises(ConfigurationError, match="not an optimizer state dict"):
        model.load_optimizer_state_dict(optimizer, {"weights": 1})
    with pytest.raises(ArgumentTypeError):
        model.optimizer_state_dict("adam")  # type: ignore[arg-type]
