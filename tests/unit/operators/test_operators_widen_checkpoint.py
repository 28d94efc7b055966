"""A widened model's checkpoint reloads into a fresh wrap of the original host, and resumes exactly."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import esper
from esper.blueprints import create_artifact
from esper.contracts import BlueprintSpec
from esper.errors import StateDictError
from esper.execution import InMemoryArtifactSource


def _host() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))


def _fresh(host: nn.Module) -> tuple[esper.MorphableModel, torch.optim.Optimizer]:
    model = esper.wrap(copy.deepcopy(host))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.attach_optimizer(optimizer)
    return model, optimizer


def _train(model: esper.MorphableModel, optimizer: torch.optim.Optimizer, steps: int) -> None:
    generator = torch.Generator().manual_seed(model.global_step)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=generator)
        y = torch.randn(16, 3, generator=generator)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.step()


def _round_trip(model: esper.MorphableModel, optimizer: torch.optim.Optimizer) -> dict:
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "optimizer": model.optimizer_state_dict(optimizer)}, buffer
    )
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("save_at", ["blending", "fossilized"])
def test_resume_from_a_widened_checkpoint_repeats_the_uninterrupted_run(save_at: str) -> None:
    host = _host()
    model, optimizer = _fresh(host)
    _train(model, optimizer, 3)
    model.widen("0", 4, init="random", blend_steps=4)
    _train(model, optimizer, 2)
    if save_at == "fossilized":
        _train(model, optimizer, 2)
        model.widenings.fossilize("0")
        _train(model, optimizer, 1)
    checkpoint = _round_trip(model, optimizer)

    resumed, resumed_optimizer = _fresh(host)
    resumed.load_state_dict(checkpoint["model"])
    resumed.load_optimizer_state_dict(resumed_optimizer, checkpoint["optimizer"])
    for run, opt in ((model, optimizer), (resumed, resumed_optimizer)):
        _train(run, opt, 3)
        if save_at == "blending":
            run.widenings.fossilize("0")
        _train(run, opt, 2)

    assert model.global_step == resumed.global_step
    expected = model.state_dict()
    got = resumed.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert resumed.model[0].base.weight.shape == (12, 6)
    assert type(resumed.unwrap()[1]) is nn.LayerNorm


def test_a_model_reloads_its_own_widened_state_dict() -> None:
    model, _ = _fresh(_host())
    model.widen("0", 2, blend_steps=0)
    state = copy.deepcopy(model.state_dict())

    model.load_state_dict(state)

    assert len(model.widenings.active()) == 1


def test_a_checkpoint_with_other_widens_is_refused() -> None:
    model, _ = _fresh(_host())
    model.widen("0", 2, blend_steps=0)
    other, _ = _fresh(_host())
    other.widen("0", 3, blend_steps=0)

    with pytest.raises(StateDictError, match="widens do not match"):
        other.load_state_dict(model.state_dict())


def test_an_unwidened_model_has_no_record_in_its_state_dict() -> None:
    model, _ = _fresh(_host())

    assert "widen_record" not in model.state_dict()


def test_a_kernel_grafted_on_a_widened_layer_comes_back_with_it() -> None:
    source = InMemoryArtifactSource()
    host = _host()
    model = esper.wrap(copy.deepcopy(host), kernel_source=source)
    model.widen("0", 4, blend_steps=0)
    model.widenings.fossilize("0")
    target = model.layer("0").target()
    assert (target.in_features, target.out_features) == (6, 12)
    spec = BlueprintSpec(family="lowrank_adapter", params={"rank": 2})
    data, _ = create_artifact(spec, target, init_seed=0)
    kernel = model.load_kernel_sync("0", seed_idx=1, kernel_artifact_id=source.add(data))
    with torch.no_grad():
        kernel.up.weight.normal_()
    x = torch.randn(5, 6)
    checkpoint = copy.deepcopy(model.state_dict())

    resumed = esper.wrap(copy.deepcopy(host), kernel_source=source)
    resumed.load_state_dict(checkpoint)

    assert torch.equal(resumed(x), model(x))


def test_no_kernel_loads_into_a_layer_a_widen_in_progress_touches() -> None:
    """A kernel built while a widen blends would be built for the width before the merge: every
    load into the producer, the norm or the consumer is refused, naming the fix, and changes
    nothing; once the widen is fossilized the layer takes kernels of its new width."""
    from esper.contracts import SeedState
    from esper.errors import IllegalTransitionError

    source = InMemoryArtifactSource()
    model = esper.wrap(copy.deepcopy(_host()), kernel_source=source)
    spec = BlueprintSpec(family="lowrank_adapter", params={"rank": 2})
    before = {name: model.layer(name).target() for name in ("0", "1", "3")}
    kernels = {
        name: source.add(create_artifact(spec, target, init_seed=0)[0])
        for name, target in before.items()
    }
    model.widen("0", 4, blend_steps=10)

    for name, kernel_id in kernels.items():
        with pytest.raises(IllegalTransitionError, match=r"widenings\.fossilize\('0'\)"):
            model.load_kernel_sync(name, seed_idx=0, kernel_artifact_id=kernel_id)
        with pytest.raises(IllegalTransitionError, match="part of the widen of '0'"):
            model.request_kernel(name, seed_idx=0, kernel_artifact_id=kernel_id)
        assert model.seed_state(name, 0) is SeedState.DORMANT

    for _ in range(10):
        model.step()
    model.widenings.fossilize("0")
    wide = model.layer("0").target()
    wide_kernel = source.add(create_artifact(spec, wide, init_seed=0)[0])
    model.load_kernel_sync("0", seed_idx=0, kernel_artifact_id=wide_kernel)
    assert model.seed_state("0", 0) is SeedState.BLENDING
