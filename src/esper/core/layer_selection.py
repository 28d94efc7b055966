"""Layer selection: which modules of a model ``esper.wrap`` gives seeds (``target_layers``), and
swapping a module for its replacement at every parent that holds it.

Selectors follow PEFT: a module type (``nn.Linear``), a dotted name or ``.suffix`` name
(``"encoder.fc1"``, ``".fc1"``), a compiled regex matched against full dotted names, or a list
mixing them; ``"kind:<name>"`` selects every module of a registered layer kind (``"kind:hf_conv1d"``,
``"kind:rms_norm"``: the form a run config uses, where no class can be written). A name or regex
that matches nothing, an unknown kind, or a name of a module that cannot carry seeds is an error
that lists the candidates.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping

from torch import nn

from esper.errors import ArgumentTypeError, ConfigurationError, UnknownLayerError
from esper.execution.arguments import shown
from esper.execution.layer_kind_registry import (
    get_layer_kind,
    kind_of,
    registered_layer_kinds,
    supported_layer_names,
)

TargetSpec = type[nn.Module] | str | re.Pattern[str]
"""A layer selector: a module type, a qualified name (or ``.suffix``), or a compiled regex."""

FUSED_INFERENCE_MODULES: tuple[type[nn.Module], ...] = (nn.TransformerEncoderLayer,)
"""Modules whose inference fast path reads their children's weights instead of calling them."""

KIND_SELECTOR = "kind:"
"""Prefix of a selector naming a layer kind (``"kind:embedding"``)."""

_SELECTOR_FORMS = (
    "a module type (nn.Linear), a dotted or '.suffix' name ('encoder.fc1', '.fc1'), a layer kind "
    "('kind:rms_norm'), a compiled regex, a list of those, or None for every supported layer"
)


def _selectors(target_layers: object) -> list[TargetSpec]:
    """``target_layers`` as a list of selectors; :class:`ArgumentTypeError` for any other form."""
    if target_layers is None:
        return [nn.Module]  # every module of a registered kind
    if isinstance(target_layers, str | re.Pattern | type):
        candidates: list[object] = [target_layers]
    elif isinstance(target_layers, Iterable) and not isinstance(target_layers, bytes | Mapping):
        candidates = list(target_layers)
    else:
        raise ArgumentTypeError(
            f"target_layers must be {_SELECTOR_FORMS}; got {shown(target_layers)} "
            f"({type(target_layers).__name__})"
        )
    for selector in candidates:
        if isinstance(selector, type) and not issubclass(selector, nn.Module):
            raise ArgumentTypeError(f"target type {selector!r} is not an nn.Module subclass")
        if not isinstance(selector, str | re.Pattern | type):
            raise ArgumentTypeError(
                f"target_layers entries must be module types, names or compiled regexes, got "
                f"{shown(selector)} ({type(selector).__name__})"
            )
    return candidates  # type: ignore[return-value]


def select_targets(model: nn.Module, target_layers: object) -> dict[int, list[str]]:
    """Modules to wrap, as ``id(module) -> every dotted name it appears under``, in model order.

    Raises:
        ArgumentTypeError: ``target_layers`` is not one of the accepted forms.
        UnknownLayerError: a name or regex matches no module (the message lists candidates).
        ConfigurationError: a named module's type cannot carry seeds.
    """
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

    by_suffix = _suffix_index(sites) if any(isinstance(s, str) for s in selectors) else {}
    chosen: set[int] = set()
    for selector in selectors:
        matched = _match(selector, sites, modules, by_suffix)
        if isinstance(selector, type) or _kind_selector(selector) is not None:
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


def _kind_selector(selector: TargetSpec) -> str | None:
    """The kind name of a ``"kind:<name>"`` selector, else ``None``.

    Raises:
        UnknownLayerError: no layer kind has that name.
    """
    if not isinstance(selector, str) or not selector.startswith(KIND_SELECTOR):
        return None
    name = selector.removeprefix(KIND_SELECTOR)
    if get_layer_kind(name) is None:
        known = [spec.name for spec in registered_layer_kinds()]
        close = difflib.get_close_matches(name, known, 3)
        hint = (
            f" Did you mean {', '.join(repr(KIND_SELECTOR + n) for n in close)}?" if close else ""
        )
        raise UnknownLayerError(
            f"target {selector!r} names no layer kind.{hint} Registered kinds: {', '.join(known)}"
        )
    return name


def _match(
    selector: TargetSpec,
    sites: Mapping[int, list[str]],
    modules: Mapping[int, nn.Module],
    by_suffix: Mapping[str, list[int]],
) -> list[int]:
    """Keys of the modules ``selector`` picks, in model order."""
    kind = _kind_selector(selector)
    if kind is not None:
        return [key for key, module in modules.items() if _kind_name(module) == kind]
    if isinstance(selector, type):
        return [key for key, module in modules.items() if isinstance(module, selector)]
    if isinstance(selector, re.Pattern):
        return [key for key, names in sites.items() if any(selector.fullmatch(n) for n in names)]
    return list(by_suffix.get(selector[1:] if selector.startswith(".") else selector, ()))


def _suffix_index(sites: Mapping[int, list[str]]) -> dict[str, list[int]]:
    """Every dotted suffix of every name (``"a.b.c"``: ``"a.b.c"``, ``"b.c"``, ``"c"``) -> the keys
    of the modules whose name is it or ends with ``"." + it``, in model order.

    One dictionary lookup then answers a name selector, instead of testing every name (a wrap of
    n named layers was O(n²)); a name ``n`` matches ``suffix`` exactly when ``suffix`` is ``n``
    or one of its dotted tails.
    """
    index: dict[str, dict[int, None]] = {}
    for key, names in sites.items():
        for name in names:
            parts = name.split(".")
            for start in range(len(parts)):
                index.setdefault(".".join(parts[start:]), {})[key] = None
    return {suffix: list(keys) for suffix, keys in index.items()}


def _kind_name(module: nn.Module) -> str | None:
    spec = kind_of(module)
    return spec.name if spec is not None else None


def modules_inside_fused(model: nn.Module) -> set[int]:
    """``id`` of every module inside a module with a fused inference path (see
    :data:`FUSED_INFERENCE_MODULES`)."""
    return {
        id(child)
        for module in model.modules()
        if isinstance(module, FUSED_INFERENCE_MODULES)
        for child in module.modules()
    }


def replace_modules(root: nn.Module, replacements: Mapping[int, nn.Module]) -> None:
    """Swap every occurrence of a module (by ``id``) for its replacement, at every parent."""
    for parent in list(root.modules()):
        # not named_children(): it yields a child registered twice under one parent only once
        for child_name, child in list(parent._modules.items()):
            replacement = replacements.get(id(child))
            if replacement is not None:
                setattr(parent, child_name, replacement)
