"""A state dict is checked before anything is allocated or changed (issue 9, item 5).

Kernels in a checkpoint are built on the meta device and their geometry compared with the
layer's first; the seed-state buffers must describe a valid lifecycle. A refused load raises
:class:`StateDictError` and leaves the model exactly as it was.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import esper
from esper.contracts import BlueprintSpec, SeedState
from esper.errors import StateDictError
from esper.execution import InMemoryArtifactSource
from esper.execution.grafted_kernel import MAX_SPEC_BYTES

Germinate = Callable[..., nn.Module]

RESIDUAL = BlueprintSpec(family="residual_mlp", params={"hidden": 6})


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def _checkpoint(source: InMemoryArtifactSource, germinate: Germinate) -> dict[str, torch.Tensor]:
    model = esper.wrap(_net(), seeds_per_layer=2, kernel_source=source)
    germinate(model, "0", 1, RESIDUAL)
    model.set_seed_alpha("0", seed_idx=1, alpha=0.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _edit_spec(state: dict[str, torch.Tensor], edit: Callable[[dict], None]) -> None:
    key = "model.0.seeds.1.spec"
    payload = json.loads(bytes(state[key].tolist()).decode())
    edit(payload)
    state[key] = torch.frombuffer(bytearray(json.dumps(payload).encode()), dtype=torch.uint8)


def _view(model: esper.MorphableModel) -> tuple[object, ...]:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [layer.seed_states for layer in model.layers.values()],
        [len(layer.seeds) for layer in model.layers.values()],
    )


def _assert_refused_and_unchanged(state: dict[str, torch.Tensor], match: str) -> None:
    target = esper.wrap(_net(), seeds_per_layer=2)
    with torch.no_grad():
        target.model[2].base.weight.fill_(0.25)  # something to lose if loading started
    before = _view(target)

    with pytest.raises(StateDictError, match=match):
        target.load_state_dict(state)

    after = _view(target)
    assert after[1:] == before[1:]
    assert after[0].keys() == before[0].keys()  # type: ignore[attr-defined]
    assert all(torch.equal(after[0][k], before[0][k]) for k in before[0])  # type: ignore[index]


def test_a_kernel_for_another_geometry_is_refused(
    source: InMemoryArtifactSource, germinate: Germinate
) -> None:
    state = _checkpoint(source, germinate)

    def wider(payload: dict) -> None:
        payload["target"]["in_features"] = payload["target"]["out_features"] = 32

    _edit_spec(state, wider)
    _assert_refused_and_unchanged(state, r"built for linear 32->32 but the layer is linear 16->16")


def test_a_spec_edited_to_a_huge_kernel_is_refused_before_allocating_it(
    source: InMemoryArtifactSource,
    germinate: Germinate,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = _checkpoint(source, germinate)
    _edit_spec(state, lambda payload: payload["blueprint"]["params"].update(hidden=65536))
    allocated: list[torch.Size] = []

    def recording(allocate: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def allocate_and_record(*args: object, **kwargs: object) -> torch.Tensor:
            tensor = allocate(*args, **kwargs)
            if not tensor.is_meta:
                allocated.append(tensor.shape)
            return tensor

        return allocate_and_record

    for name in ("empty", "empty_like"):  # what module constructors and to_empty() call
        monkeypatch.setattr(torch, name, recording(getattr(torch, name)))

    _assert_refused_and_unchanged(
        state, r"has shape \(6, 16\) but the kernel's blueprint needs \(65536, 16\)"
    )
    assert all(math.prod(shape) < 65536 for shape in allocated)


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s.__setitem__("model.0.seeds.1.spec", torch.zeros(4, 4, dtype=torch.uint8)),
        lambda s: s.__setitem__("model.0.seeds.1.spec", torch.zeros(8)),
        lambda s: s.__setitem__(
            "model.0.seeds.1.spec", torch.full((MAX_SPEC_BYTES + 1,), 32, dtype=torch.uint8)
        ),
        lambda s: s.__setitem__(
            "model.0.seeds.1.spec", torch.frombuffer(bytearray(b"[" * 5000), dtype=torch.uint8)
        ),
    ],
    ids=["two_dimensional", "float", "oversized", "deeply_nested"],
)
def test_malformed_spec_tensors_are_refused(
    source: InMemoryArtifactSource, germinate: Germinate, edit: Callable[[dict], None]
) -> None:
    state = _checkpoint(source, germinate)
    edit(state)

    _assert_refused_and_unchanged(state, "malformed seed spec")


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        (
            "model.0.seed_state.lifecycle",
            torch.tensor([0, 9], dtype=torch.int8),
            "not a seed state",
        ),
        (
            "model.2.seed_state.lifecycle",
            torch.tensor([int(SeedState.ACTIVE), 0], dtype=torch.int8),
            "holds no kernel",
        ),
        ("model.0.seed_state.alpha", torch.tensor([0.0, math.nan]), "alphas lie within"),
        ("model.0.seed_state.alpha", torch.tensor([0.0, 5.0]), "alphas lie within"),
        ("model.0.seed_state.error_count", torch.tensor([0, -3], dtype=torch.int32), "negative"),
        ("model.0.seed_state.alpha", torch.zeros(3), "shape"),
    ],
    ids=[
        "unknown_state",
        "running_without_kernel",
        "nan_alpha",
        "alpha_above_one",
        "negative",
        "shape",
    ],
)
def test_invalid_seed_layout_buffers_are_refused(
    source: InMemoryArtifactSource,
    germinate: Germinate,
    key: str,
    value: torch.Tensor,
    match: str,
) -> None:
    state = _checkpoint(source, germinate)
    state[key] = value

    _assert_refused_and_unchanged(state, match)


def test_a_kernel_for_a_seed_the_layer_lacks_is_refused(
    source: InMemoryArtifactSource, germinate: Germinate
) -> None:
    model = esper.wrap(_net(), seeds_per_layer=3, kernel_source=source)
    germinate(model, "0", 2, RESIDUAL)
    state = {k: v for k, v in model.state_dict().items() if "seed_state" not in k}

    _assert_refused_and_unchanged(state, "seeds_per_layer >= 3")


def test_a_key_that_only_looks_like_a_seed_spec_is_left_to_load_state_dict(
    source: InMemoryArtifactSource, germinate: Germinate
) -> None:
    state = _checkpoint(source, germinate)
    state["model.0.seeds.x.spec"] = state["model.0.seeds.1.spec"]
    state["model.0.seeds.01.spec"] = state["model.0.seeds.1.spec"]
    target = esper.wrap(_net(), seeds_per_layer=2)

    result = target.load_state_dict(state, strict=False)

    assert sorted(result.unexpected_keys) == ["model.0.seeds.01.spec", "model.0.seeds.x.spec"]
    assert target.seed_state("0", 1) is SeedState.BLENDING


def test_a_valid_checkpoint_still_restores_the_kernel(
    source: InMemoryArtifactSource, germinate: Germinate
) -> None:
    state = _checkpoint(source, germinate)
    target = esper.wrap(_net(), seeds_per_layer=2)

    target.load_state_dict(state)

    assert target.seed_state("0", 1) is SeedState.BLENDING
    assert all(torch.equal(target.state_dict()[k], v) for k, v in state.items())
