"""Target selection by name answers from a suffix index: the same targets and the same errors as
matching every name against every module (the rule it replaced, kept here as the oracle)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping

import pytest
from torch import nn

from esper.core.layer_selection import TargetSpec, _selectors, select_targets
from esper.errors import ConfigurationError, EsperError, UnknownLayerError
from esper.execution.arguments import shown
from esper.execution.layer_kind_registry import kind_of, supported_layer_names

# The selection as it was before the suffix index (a copy, as the oracle of these tests).


def _old_select_targets(model: nn.Module, target_layers: object) -> dict[int, list[str]]:
    selectors = _selectors(target_layers)
    sites: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    inside_attention: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if not name:
            continue
        sites.setdefault(id(module), []).append(name)
        modules[id(module)] = module
        if isinstance(module, nn.MultiheadAttention):
            inside_attention.update(id(m) for m in module.modules() if m is not module)

    def supported(module: nn.Module) -> bool:
        return kind_of(module) is not None and id(module) not in inside_attention

    chosen: set[int] = set()
    for selector in selectors:
        matched = _old_match(selector, sites, modules)
        if isinstance(selector, type):
            chosen.update(key for key in matched if supported(modules[key]))
            continue
        if not matched:
            names = [n for key, ns in sites.items() if supported(modules[key]) for n in ns]
            close = difflib.get_close_matches(str(getattr(selector, "pattern", selector)), names, 3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UnknownLayerError(
                f"target {shown(selector)} matches no module of the model.{hint} Layers that can "
                f"carry seeds: {', '.join(names) or 'none'}"
            )
        for key in matched:
            module = modules[key]
            if not supported(module):
                why = (
                    "it is part of a MultiheadAttention (target the attention module instead)"
                    if key in inside_attention
                    else f"it is a {type(module).__name__}"
                )
                raise ConfigurationError(
                    f"layer {sites[key][0]!r} cannot carry seeds: {why}. Supported layer kinds: "
                    f"{supported_layer_names()} (declare another with esper.register_layer_kind)"
                )
            chosen.add(key)
    if not chosen:
        raise UnknownLayerError(
            f"no layer of the model matches target_layers={shown(target_layers)}; supported layer "
            f"kinds: {supported_layer_names()}"
        )
    return {key: names for key, names in sites.items() if key in chosen}


def _old_match(
    selector: TargetSpec, sites: Mapping[int, list[str]], modules: Mapping[int, nn.Module]
) -> list[int]:
    if isinstance(selector, type):
        return [key for key, module in modules.items() if isinstance(module, selector)]
    if isinstance(selector, re.Pattern):
        return [key for key, names in sites.items() if any(selector.fullmatch(n) for n in names)]
    suffix = selector[1:] if selector.startswith(".") else selector
    return [
        key
        for key, names in sites.items()
        if any(n == suffix or n.endswith("." + suffix) for n in names)
    ]


def _model() -> nn.Module:
    shared = nn.Linear(8, 8)
    model = nn.Module()
    model.encoder = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    model.decoder = nn.ModuleDict(
        {"fc1": nn.Linear(8, 8), "norm": nn.LayerNorm(8), "drop": nn.Dropout()}
    )
    model.block = nn.Module()
    model.block.fc1 = nn.Linear(8, 8)
    model.block.inner = nn.Module()
    model.block.inner.fc1 = nn.Conv2d(3, 3, 1)
    model.attn = nn.MultiheadAttention(8, 2)
    model.left = shared
    model.right = nn.Sequential(shared)
    return model


NAME_PATTERNS = [
    "encoder.0",
    "encoder.2",
    ".fc1",
    "fc1",
    "inner.fc1",
    ".inner.fc1",
    "block.inner.fc1",
    "decoder.fc1",
    "left",
    "right.0",
    "0",
    ".0",
    "attn",
    "c1",
    "..fc1",
    "fc1.",
    "ncoder.0",
    "nothing",
    "decoder.drop",
    "decoder.norm",
    "encoder.1",
    "attn.out_proj",
    "out_proj",
]


def _outcome(select: Callable[[nn.Module, object], object], target_layers: object) -> object:
    """What ``select`` answers for a fresh model: its targets by names, or its error."""
    try:
        chosen = select(_model(), target_layers)
    except EsperError as error:
        return (type(error), str(error))
    assert isinstance(chosen, dict)
    return list(chosen.values())


@pytest.mark.parametrize(
    "target_layers",
    [
        *NAME_PATTERNS,
        NAME_PATTERNS[:10],
        ["fc1", re.compile(r"encoder\.\d"), nn.Conv2d],
        [".0", "nothing"],
        None,
        nn.Linear,
        re.compile(r".*fc1"),
        re.compile("fc1"),
    ],
)
def test_selection_answers_what_it_answered_before(target_layers: object) -> None:
    assert _outcome(select_targets, target_layers) == _outcome(_old_select_targets, target_layers)


EXPECTED = {
    ".fc1": ["decoder.fc1", "block.fc1", "block.inner.fc1"],
    "0": ["encoder.0", "right.0"],
    "left": ["left", "right.0"],
    "encoder.2": ["encoder.2"],
}


@pytest.mark.parametrize(("pattern", "first_names"), EXPECTED.items())
def test_name_selection_picks_these_layers_in_model_order(
    pattern: str, first_names: list[str]
) -> None:
    chosen = select_targets(_model(), pattern)
    assert sorted(n for names in chosen.values() for n in names) == sorted(
        {n for names in chosen.values() for n in names}
    )
    assert [n for names in chosen.values() for n in names if n in first_names] == first_names


@pytest.mark.parametrize(
    ("pattern", "error"),
    [
        ("nothing", "target 'nothing' matches no module of the model."),
        ("c1", "target 'c1' matches no module of the model."),
        ("ncoder.0", "target 'ncoder.0' matches no module of the model. Did you mean 'encoder.0'"),
        ("decoder.drop", "layer 'decoder.drop' cannot carry seeds: it is a Dropout."),
        ("attn.out_proj", "layer 'attn.out_proj' cannot carry seeds: it is part of a Multihead"),
        ("encoder.1", "layer 'encoder.1' cannot carry seeds: it is a ReLU."),
    ],
)
def test_unknown_or_unsupported_names_raise_as_before(pattern: str, error: str) -> None:
    with pytest.raises(EsperError) as raised:
        select_targets(_model(), pattern)
    assert str(raised.value).startswith(error)


def test_mixed_selectors_and_every_name_of_a_model_select_the_same_as_its_modules() -> None:
    model = _model()
    everything = select_targets(model, None)
    names = [n for ns in everything.values() for n in ns]
    assert select_targets(model, names) == everything
    mixed = select_targets(model, [re.compile(r"encoder\.[02]"), ".fc1", nn.Conv2d])
    assert [ns[0] for ns in mixed.values()] == [
        "encoder.0",
        "encoder.2",
        "decoder.fc1",
        "block.fc1",
        "block.inner.fc1",
    ]
