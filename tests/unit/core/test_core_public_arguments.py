"""Arguments at the public boundary (issue 9, item 6): every bad value gives one clear error from
``esper.errors`` (a wrong type an ``ArgumentTypeError``, also a ``TypeError``; a bad seed index a
``SeedIndexError``) and a failed call changes nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import esper
from esper.errors import (
    ArgumentTypeError,
    ConfigurationError,
    EsperError,
    SeedIndexError,
    UnknownLayerError,
)
from esper.execution import InMemoryArtifactSource, KasminaLayer
from esper.execution.arguments import MAX_SEEDS_PER_LAYER

KernelFor = Callable[..., str]
Germinate = Callable[..., nn.Module]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))


# -- esper.wrap --------------------------------------------------------------------------------

WRAP_TYPE_ERRORS = [
    ("model", 42),
    ("model", "model"),
    ("model", None),
    ("target_layers", 5),
    ("target_layers", 2.5),
    ("target_layers", {"0": nn.Linear}),
    ("target_layers", [nn.Linear, 5]),
    ("target_layers", [int]),
    ("seeds_per_layer", 2.5),
    ("seeds_per_layer", "3"),
    ("seeds_per_layer", True),
    ("seeds_per_layer", None),
    ("blend_steps", 1.5),
    ("blend_steps", "20"),
    ("max_retries", 1.0),
    ("retry_backoff_steps", True),
    ("health_every", "10"),
    ("health_every", 0.5),
    ("inplace", "yes"),
    ("kernel_source", 42),
    ("kernel_cache", "cache"),
    ("telemetry_sink", object()),
]
WRAP_RANGE_ERRORS = [
    ("seeds_per_layer", 0),
    ("seeds_per_layer", -1),
    ("seeds_per_layer", 10**7),
    ("seeds_per_layer", MAX_SEEDS_PER_LAYER + 1),
    ("blend_steps", 0),
    ("blend_steps", 2**40),
    ("max_retries", -1),
    ("max_retries", 10**6),
    ("retry_backoff_steps", 0),
    ("health_every", -1),
]


def _wrap_with(argument: str, value: object) -> tuple[nn.Module, Callable[[], object]]:
    model = _net()
    kwargs: dict[str, Any] = {"inplace": True, argument: value}
    if argument == "model":
        kwargs.pop("model")
        return model, lambda: esper.wrap(value, **kwargs)  # type: ignore[arg-type]
    return model, lambda: esper.wrap(model, **kwargs)


@pytest.mark.parametrize(("argument", "value"), WRAP_TYPE_ERRORS, ids=repr)
def test_wrap_refuses_a_wrong_type_with_one_clear_error(argument: str, value: object) -> None:
    model, call = _wrap_with(argument, value)

    with pytest.raises(ArgumentTypeError) as info:
        call()

    assert isinstance(info.value, TypeError) and isinstance(info.value, ConfigurationError)
    assert argument.split("_")[0] in str(info.value) or argument == "model"
    assert not any(isinstance(m, KasminaLayer) for m in model.modules())  # nothing changed


@pytest.mark.parametrize(("argument", "value"), WRAP_RANGE_ERRORS, ids=repr)
def test_wrap_refuses_an_out_of_range_setting(argument: str, value: object) -> None:
    model, call = _wrap_with(argument, value)

    with pytest.raises(ConfigurationError, match=argument) as info:
        call()

    assert not isinstance(info.value, TypeError)
    assert not any(isinstance(m, KasminaLayer) for m in model.modules())


def test_the_seed_limit_itself_is_accepted() -> None:
    model = esper.wrap(_net(), "0", seeds_per_layer=MAX_SEEDS_PER_LAYER)
    assert model.layer("0").num_seeds == MAX_SEEDS_PER_LAYER
    numpy_count = esper.wrap(_net(), "0", seeds_per_layer=np.int64(3))  # type: ignore[arg-type]
    assert numpy_count.layer("0").num_seeds == 3
    assert type(numpy_count.layer("0").num_seeds) is int


@pytest.mark.parametrize(
    "settings",
    [{"num_seeds": True}, {"num_seeds": 2.0}, {"health_every": -1}, {"layer_name": 3}],
    ids=repr,
)
def test_a_kasmina_layer_checks_its_settings_too(settings: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        KasminaLayer(nn.Linear(2, 2), **settings)  # type: ignore[arg-type]


# -- MorphableModel and KasminaLayer methods ---------------------------------------------------


@pytest.fixture
def grown(
    source: InMemoryArtifactSource, germinate: Germinate
) -> tuple[esper.MorphableModel, torch.optim.Optimizer]:
    """Layer "0": seed 0 BLENDING with a kernel, seed 1 DORMANT; an attached optimizer."""
    model = esper.wrap(_net(), seeds_per_layer=2, kernel_source=source, health_every=0)
    optimizer = torch.optim.Adam(model.parameters())
    model.attach_optimizer(optimizer)
    germinate(model, "0", 0)
    model.set_seed_alpha("0", seed_idx=0, alpha=0.5)
    return model, optimizer


def _snapshot(model: esper.MorphableModel, optimizer: torch.optim.Optimizer) -> tuple[object, ...]:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {
            name: [dataclasses.replace(slot) for slot in layer.seed_layout.slots]
            for name, layer in model.layers.items()
        },
        {name: sorted(layer.seeds.keys()) for name, layer in model.layers.items()},
        model.pending_loads(),
        model.global_step,
        [(g.get("esper_seed"), len(g["params"])) for g in optimizer.param_groups],
    )


def _assert_unchanged(before: tuple[object, ...], after: tuple[object, ...]) -> None:
    state_before, state_after = before[0], after[0]
    assert isinstance(state_before, dict) and isinstance(state_after, dict)
    assert state_before.keys() == state_after.keys()
    for key in state_before:
        assert torch.equal(state_before[key], state_after[key]), key
    assert before[1:] == after[1:]


BAD_SEED_INDEXES = [True, False, -1, 2, 10**20, 1.0, "0", None, np.bool_(True)]

Call = Callable[[esper.MorphableModel, object, str], object]

SEED_METHODS: dict[str, Call] = {
    "MorphableModel.request_kernel": lambda m, i, k: m.request_kernel(
        "0",
        seed_idx=i,
        kernel_artifact_id=k,  # type: ignore[arg-type]
    ),
    "MorphableModel.load_kernel": lambda m, i, k: asyncio.run(
        m.load_kernel("0", seed_idx=i, kernel_artifact_id=k)  # type: ignore[arg-type]
    ),
    "MorphableModel.load_kernel_sync": lambda m, i, k: m.load_kernel_sync(
        "0",
        seed_idx=i,
        kernel_artifact_id=k,  # type: ignore[arg-type]
    ),
    "MorphableModel.unload_kernel": lambda m, i, k: m.unload_kernel("0", seed_idx=i),  # type: ignore[arg-type]
    "MorphableModel.fossilize": lambda m, i, k: m.fossilize("0", seed_idx=i),  # type: ignore[arg-type]
    "MorphableModel.set_seed_alpha": lambda m, i, k: m.set_seed_alpha(
        "0",
        seed_idx=i,
        alpha=0.3,  # type: ignore[arg-type]
    ),
    "MorphableModel.seed_layout": lambda m, i, k: m.seed_state("0", i),  # type: ignore[arg-type]
    "KasminaLayer.request_kernel": lambda m, i, k: m.layer("0").request_kernel(i, k),  # type: ignore[arg-type]
    "KasminaLayer.complete_load": lambda m, i, k: m.layer("0").complete_load(i),  # type: ignore[arg-type]
    "KasminaLayer.unload": lambda m, i, k: m.layer("0").unload(i),  # type: ignore[arg-type]
    "KasminaLayer.fossilize": lambda m, i, k: m.layer("0").fossilize(i),  # type: ignore[arg-type]
    "KasminaLayer.set_alpha": lambda m, i, k: m.layer("0").set_alpha(i, 0.3),  # type: ignore[arg-type]
    "KasminaLayer.kernel": lambda m, i, k: m.layer("0").kernel(i),  # type: ignore[arg-type]
    "KasminaLayer.graft": lambda m, i, k: m.layer("0").graft(i, None),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("bad_index", BAD_SEED_INDEXES, ids=repr)
@pytest.mark.parametrize("method", list(SEED_METHODS))
def test_every_seed_method_refuses_a_bad_index_and_changes_nothing(
    grown: tuple[esper.MorphableModel, torch.optim.Optimizer],
    kernel_for: KernelFor,
    method: str,
    bad_index: object,
) -> None:
    model, optimizer = grown
    kernel_id = kernel_for(model, "0")
    before = _snapshot(model, optimizer)

    with pytest.raises(SeedIndexError, match=r"valid: 0\.\.1"):
        SEED_METHODS[method](model, bad_index, kernel_id)

    _assert_unchanged(before, _snapshot(model, optimizer))


def test_a_numpy_integer_is_a_valid_seed_index(
    grown: tuple[esper.MorphableModel, torch.optim.Optimizer],
) -> None:
    model, _ = grown
    model.set_seed_alpha("0", seed_idx=np.int64(0), alpha=0.75)  # type: ignore[arg-type]

    assert model.layer("0").seed_layout.slots[0].alpha == 0.75
    assert list(model.layer("0").seeds.keys()) == ["0"]


OTHER_BAD_CALLS: dict[
    str, tuple[type[EsperError], Callable[[esper.MorphableModel, str], object]]
] = {
    "layer(5)": (ArgumentTypeError, lambda m, k: m.layer(5)),  # type: ignore[arg-type]
    "layer(None)": (ArgumentTypeError, lambda m, k: m.layer(None)),  # type: ignore[arg-type]
    "layer('nope')": (UnknownLayerError, lambda m, k: m.layer("nope")),
    "unload_kernel(layer=3)": (ArgumentTypeError, lambda m, k: m.unload_kernel(3, seed_idx=0)),  # type: ignore[arg-type]
    "alpha='0.5'": (ArgumentTypeError, lambda m, k: m.set_seed_alpha("0", seed_idx=0, alpha="0.5")),  # type: ignore[arg-type]
    "alpha=True": (ArgumentTypeError, lambda m, k: m.set_seed_alpha("0", seed_idx=0, alpha=True)),
    "alpha=nan": (
        ConfigurationError,
        lambda m, k: m.set_seed_alpha("0", seed_idx=0, alpha=math.nan),
    ),
    "alpha=1.5": (ConfigurationError, lambda m, k: m.set_seed_alpha("0", seed_idx=0, alpha=1.5)),
    "alpha=None": (ArgumentTypeError, lambda m, k: m.set_seed_alpha("0", seed_idx=0, alpha=None)),  # type: ignore[arg-type]
    "timeout=-1": (
        ConfigurationError,
        lambda m, k: m.load_kernel_sync("0", seed_idx=1, kernel_artifact_id=k, timeout=-1),
    ),
    "timeout=0": (
        ConfigurationError,
        lambda m, k: m.load_kernel_sync("0", seed_idx=1, kernel_artifact_id=k, timeout=0),
    ),
    "timeout=nan": (
        ConfigurationError,
        lambda m, k: m.load_kernel_sync("0", seed_idx=1, kernel_artifact_id=k, timeout=math.nan),
    ),
    "timeout='5'": (
        ArgumentTypeError,
        lambda m, k: m.load_kernel_sync("0", seed_idx=1, kernel_artifact_id=k, timeout="5"),
    ),  # type: ignore[arg-type]
    "kernel id 5": (
        ConfigurationError,
        lambda m, k: m.request_kernel("0", seed_idx=1, kernel_artifact_id=5),
    ),  # type: ignore[arg-type]
    "kernel id + newline": (
        ConfigurationError,
        lambda m, k: m.request_kernel("0", seed_idx=1, kernel_artifact_id=k + "\n"),
    ),
    "step(graftable=5)": (ArgumentTypeError, lambda m, k: m.step(graftable=5)),  # type: ignore[arg-type]
    "step(graftable={'0': 1})": (ArgumentTypeError, lambda m, k: m.step(graftable={"0": 1})),  # type: ignore[dict-item]
    "step(graftable={'0': [True]})": (SeedIndexError, lambda m, k: m.step(graftable={"0": [True]})),  # type: ignore[list-item]
    "step(graftable={'nope': [0]})": (
        UnknownLayerError,
        lambda m, k: m.step(graftable={"nope": [0]}),
    ),
    "advance('3')": (ArgumentTypeError, lambda m, k: m.layer("0").advance("3")),  # type: ignore[arg-type]
    "advance(graftable=[1.0])": (
        ArgumentTypeError,
        lambda m, k: m.layer("0").advance(1, graftable=[1.0]),
    ),  # type: ignore[list-item]
    "collect_telemetry(reduce=5)": (ArgumentTypeError, lambda m, k: m.collect_telemetry(reduce=5)),  # type: ignore[arg-type]
    "on_kernel_grafted(5)": (ArgumentTypeError, lambda m, k: m.on_kernel_grafted(5)),  # type: ignore[arg-type]
    "on_kernel_removed(None)": (ArgumentTypeError, lambda m, k: m.on_kernel_removed(None)),  # type: ignore[arg-type]
    "attach_optimizer(42)": (ArgumentTypeError, lambda m, k: m.attach_optimizer(42)),  # type: ignore[arg-type]
    "attach(cache=42)": (ArgumentTypeError, lambda m, k: m.layer("0").attach(42)),  # type: ignore[arg-type]
    "graft(cached=42)": (ArgumentTypeError, lambda m, k: m.layer("0").graft(1, 42)),  # type: ignore[arg-type]
    "unwrap(42)": (ConfigurationError, lambda m, k: esper.unwrap(42)),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("call", list(OTHER_BAD_CALLS))
def test_every_other_bad_argument_is_refused_and_changes_nothing(
    grown: tuple[esper.MorphableModel, torch.optim.Optimizer], kernel_for: KernelFor, call: str
) -> None:
    model, optimizer = grown
    kernel_id = kernel_for(model, "0")
    expected, run = OTHER_BAD_CALLS[call]
    before = _snapshot(model, optimizer)

    with pytest.raises(expected):
        run(model, kernel_id)

    _assert_unchanged(before, _snapshot(model, optimizer))


def test_a_failed_call_leaves_the_model_working(
    grown: tuple[esper.MorphableModel, torch.optim.Optimizer], kernel_for: KernelFor
) -> None:
    model, _ = grown
    x = torch.randn(2, 6)
    expected = model(x)
    for bad in (True, 7, "1"):
        with pytest.raises(SeedIndexError):
            model.unload_kernel("0", seed_idx=bad)  # type: ignore[arg-type]

    model.unload_kernel("0", seed_idx=0)  # the right call still works afterwards

    assert torch.equal(model(x), model.model[2](model.model[1](model.layer("0").base(x))))
    assert not torch.equal(model(x), expected)
    assert list(model.layer("0").seeds.keys()) == []
    assert not any(".seeds.True" in key for key in model.state_dict())


# -- kernel cache and artifact sources ---------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_bytes": "1GB"}, ArgumentTypeError),
        ({"max_bytes": 0}, ConfigurationError),
        ({"max_entries": 2.5}, ArgumentTypeError),
        ({"max_workers": 0}, ConfigurationError),
        ({"max_workers": True}, ArgumentTypeError),
        ({"source": "artifacts/"}, ArgumentTypeError),
    ],
    ids=repr,
)
def test_kernel_cache_settings_are_checked(
    kwargs: dict[str, object], error: type[Exception]
) -> None:
    from esper.execution import KernelCache

    with pytest.raises(error):
        KernelCache(**kwargs)  # type: ignore[arg-type]


def test_artifact_sources_refuse_what_is_not_bytes_or_a_path(tmp_path: object) -> None:
    from esper.execution import DirectoryArtifactSource

    with pytest.raises(ArgumentTypeError, match="must be bytes"):
        InMemoryArtifactSource().add("not bytes")  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match="folder path"):
        DirectoryArtifactSource(42)  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match="must be bytes"):
        DirectoryArtifactSource(str(tmp_path)).add([1, 2])  # type: ignore[arg-type]
