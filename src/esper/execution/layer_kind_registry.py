"""Layer-kind registry: which module types can carry seeds, and how a seed attaches to each.

A *layer kind* says, for the modules it covers, three things (in the spirit of PEFT's
custom-module mapping, ``LoraConfig._register_custom_module``):

* which modules it covers: classes (subclasses included), classes named by their dotted path
  (``"transformers.pytorch_utils.Conv1D"``: matched by name, so the library that defines them is
  never imported), and/or a predicate for duck-typed modules (``LlamaRMSNorm``-style classes);
* the kernel geometry of one such module (:class:`LayerGeometry`: channels read and written,
  where the channel dimension is, how many spatial dimensions follow it);
* where a kernel reads (``"input"``: the module's first argument, ``"output"``: what it returns,
  the first element if it returns a tuple); a kernel always adds to the output.

Every built-in kind (Linear, Conv, norms, attention, GPT-2's Conv1D, RMSNorm, Embedding) is
registered through :func:`register_layer_kind` like a user's (see
:mod:`esper.execution.layer_kinds`). A module's kind is the kind registered for the most specific
class in its MRO; a module of no registered class falls back to the predicates, in registration
order::

    import esper
    esper.register_layer_kind(
        "my_proj",
        module_types=[MyProjection],
        geometry=lambda m: esper.LayerGeometry(m.d_in, m.d_out),
        reads="input",
    )
    model = esper.wrap(model, target_layers=[MyProjection])
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from torch import nn

from esper.errors import ArgumentTypeError, ConfigurationError


class GraftPoint(Enum):
    """Which tensor a layer's kernels read."""

    INPUT = "input"
    OUTPUT = "output"


MERGE_RULES: tuple[str, ...] = (
    "linear_input",
    "transposed_linear_input",
    "affine_output",
    "attention_output",
    "embedding_output",
)
"""How a kept linear kernel folds into the host's weights (see :mod:`esper.core.weight_merge`):

* ``linear_input``: the host computes ``x @ weight.T + bias`` (``weight`` is ``(out, in)``) and
  kernels read its input (Linear);
* ``transposed_linear_input``: the same with ``weight`` stored ``(in, out)`` (GPT-2's Conv1D);
* ``affine_output``: the host's output is ``weight`` applied over channels plus ``bias`` and
  kernels read it (Conv1d/Conv2d with ``groups=1``);
* ``attention_output``: kernels read the output of the host's ``out_proj`` (MultiheadAttention);
* ``embedding_output``: the host looks rows up in ``weight`` and kernels read them (Embedding).
"""

FEATURE_KINDS: tuple[str, ...] = (
    "linear",
    "conv1d",
    "conv2d",
    "layer_norm",
    "batch_norm1d",
    "batch_norm2d",
    "multihead_attention",
)
"""Kinds that have a structural one-hot column in Tamiyo's node features; any other kind names
one of them as ``like`` (or none: then no column is set)."""

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


@dataclass(frozen=True)
class LayerGeometry:
    """The kernel geometry of one host module.

    Attributes:
        in_features: channels of the tensor a kernel reads.
        out_features: channels of the host's output (what a kernel writes).
        channel_dim: ``-1``: features last (``(..., C)``); ``1``: channels first (``(N, C, *S)``).
        spatial_dims: dimensions after the channel dimension when ``channel_dim`` is 1 (0, 1, 2).
    """

    in_features: int
    out_features: int
    channel_dim: int = -1
    spatial_dims: int = 0

    def problem(self) -> str | None:
        """Why this is not a usable geometry, or ``None``."""
        for field in ("in_features", "out_features", "channel_dim", "spatial_dims"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool):
                return f"{field} must be an int, got {value!r}"
        if self.in_features < 1 or self.out_features < 1:
            return f"widths must be >= 1, got {self.in_features} -> {self.out_features}"
        if self.channel_dim not in (-1, 1):
            return f"channel_dim must be -1 or 1, got {self.channel_dim}"
        if self.spatial_dims not in (0, 1, 2) or (self.channel_dim == -1 and self.spatial_dims):
            return (
                f"spatial_dims must be 0 with features last, or 0-2 with channels first; got "
                f"{self.spatial_dims} with channel_dim {self.channel_dim}"
            )
        return None


GeometryFn = Callable[[nn.Module], LayerGeometry]
MatchFn = Callable[[nn.Module], bool]


@dataclass(frozen=True)
class LayerKindSpec:
    """One registered layer kind (see :func:`register_layer_kind` for the fields' meaning)."""

    name: str
    module_types: tuple[type[nn.Module], ...]
    type_paths: tuple[str, ...]
    matches: MatchFn | None
    geometry: GeometryFn
    reads: GraftPoint
    returns_tuple: bool
    merge: str | None
    like: str | None

    def covers_class(self, cls: type) -> bool:
        """Whether ``cls`` itself (not its bases) is one of this kind's classes."""
        return cls in self.module_types or qualified_name(cls) in self.type_paths

    def describe(self) -> str:
        """The classes (or predicate) this kind covers, for messages."""
        names = [t.__name__ for t in self.module_types] + list(self.type_paths)
        if self.matches is not None:
            names.append(f"modules matched by {getattr(self.matches, '__name__', 'a predicate')}")
        return ", ".join(names)


_KINDS: dict[str, LayerKindSpec] = {}
_LOCK = threading.Lock()


def qualified_name(cls: type) -> str:
    """``module.QualName`` of a class: how a kind names a class it must not import."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_layer_kind(
    name: str,
    *,
    geometry: GeometryFn,
    module_types: Sequence[type[nn.Module] | str] = (),
    matches: MatchFn | None = None,
    reads: str | GraftPoint = "input",
    returns_tuple: bool = False,
    merge: str | None = None,
    like: str | None = None,
) -> LayerKindSpec:
    """Declare a layer kind: modules it covers get seeds from ``esper.wrap``.

    Args:
        name: the kind's name (``[a-z][a-z0-9_]*``), as it appears in kernel targets, telemetry
            and ``kind:<name>`` layer selectors.
        geometry: ``module -> LayerGeometry``: the kernel geometry of one covered module.
        module_types: classes covered (subclasses included), or their dotted paths
            (``"package.module.Class"``) for classes of a library Esper must not import.
        matches: a predicate covering modules of no registered class (duck typing).
        reads: ``"input"`` (the module's first argument) or ``"output"`` (its output).
        returns_tuple: the module returns ``(output, *extras)``; kernels read and add to
            ``output`` and the extras pass through.
        merge: one of :data:`MERGE_RULES` if a kept linear kernel folds exactly into the
            module's weights on ``unwrap()``; ``None``: kept kernels stay beside it as a hook.
        like: the kind of :data:`FEATURE_KINDS` Tamiyo's structural features treat it as.

    Returns:
        The registered :class:`LayerKindSpec`.

    Raises:
        ConfigurationError: the name is malformed or taken, a class is already covered by
            another kind, nothing is covered, or ``reads``/``merge``/``like`` is unknown
            (:class:`~esper.errors.ArgumentTypeError` for arguments of the wrong type).
    """
    spec = _checked_spec(name, geometry, module_types, matches, reads, returns_tuple, merge, like)
    with _LOCK:
        if name in _KINDS:
            raise ConfigurationError(
                f"layer kind {name!r} is already registered (for {_KINDS[name].describe()}); "
                f"choose another name or call unregister_layer_kind({name!r}) first"
            )
        for other in _KINDS.values():
            taken = [t.__name__ for t in spec.module_types if t in other.module_types]
            taken += [p for p in spec.type_paths if p in other.type_paths]
            if taken:
                raise ConfigurationError(
                    f"cannot register layer kind {name!r}: {', '.join(taken)} already belongs to "
                    f"layer kind {other.name!r}; register a subclass, or call "
                    f"unregister_layer_kind({other.name!r}) first"
                )
        _KINDS[name] = spec
    return spec


def _checked_spec(
    name: object,
    geometry: object,
    module_types: object,
    matches: object,
    reads: object,
    returns_tuple: object,
    merge: object,
    like: object,
) -> LayerKindSpec:
    """The spec :func:`register_layer_kind` describes, or the error naming what is wrong."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigurationError(
            f"layer kind name must match [a-z][a-z0-9_]* (at most 64 characters), got {name!r}"
        )
    if not callable(geometry):
        raise ArgumentTypeError(
            f"layer kind {name!r}: geometry must be a function module -> LayerGeometry, got "
            f"{type(geometry).__name__}"
        )
    if matches is not None and not callable(matches):
        raise ArgumentTypeError(
            f"layer kind {name!r}: matches must be a function module -> bool or None, got "
            f"{type(matches).__name__}"
        )
    if isinstance(module_types, str | type) or not isinstance(module_types, Sequence):
        raise ArgumentTypeError(
            f"layer kind {name!r}: module_types must be a list of classes or dotted class paths, "
            f"got {module_types!r}"
        )
    classes: list[type[nn.Module]] = []
    paths: list[str] = []
    for entry in module_types:
        if isinstance(entry, type) and issubclass(entry, nn.Module):
            classes.append(entry)
        elif isinstance(entry, str) and re.fullmatch(r"[A-Za-z_][\w.]*\.[A-Za-z_]\w*", entry):
            paths.append(entry)
        else:
            raise ArgumentTypeError(
                f"layer kind {name!r}: module_types entries must be nn.Module subclasses or "
                f"dotted paths like 'package.module.Class', got {entry!r}"
            )
    if not classes and not paths and matches is None:
        raise ConfigurationError(
            f"layer kind {name!r} covers no module: give module_types, matches, or both"
        )
    try:
        graft_point = GraftPoint(reads.value if isinstance(reads, GraftPoint) else reads)
    except ValueError:
        raise ConfigurationError(
            f"layer kind {name!r}: reads must be 'input' or 'output', got {reads!r}"
        ) from None
    if not isinstance(returns_tuple, bool):
        raise ArgumentTypeError(f"layer kind {name!r}: returns_tuple must be True or False")
    if merge is not None and merge not in MERGE_RULES:
        raise ConfigurationError(
            f"layer kind {name!r}: unknown merge rule {merge!r}; known rules: "
            f"{', '.join(MERGE_RULES)} (or None: kept kernels stay beside the layer)"
        )
    if like is not None and like not in FEATURE_KINDS:
        raise ConfigurationError(
            f"layer kind {name!r}: like must be one of {', '.join(FEATURE_KINDS)} or None, got "
            f"{like!r}"
        )
    return LayerKindSpec(
        name=str(name),  # a LayerKind member becomes its plain value
        module_types=tuple(classes),
        type_paths=tuple(paths),
        matches=matches,
        geometry=geometry,
        reads=graft_point,
        returns_tuple=returns_tuple,
        merge=merge,
        like=like,
    )


def unregister_layer_kind(name: str) -> LayerKindSpec:
    """Remove a registered kind (already wrapped layers keep working); returns its spec.

    Raises:
        ConfigurationError: no kind has that name.
    """
    with _LOCK:
        try:
            return _KINDS.pop(name)
        except KeyError:
            raise ConfigurationError(
                f"no layer kind named {name!r}; registered kinds: {', '.join(_KINDS)}"
            ) from None


def registered_layer_kinds() -> tuple[LayerKindSpec, ...]:
    """Every registered kind, in registration order (the built-ins first)."""
    return tuple(_KINDS.values())


def get_layer_kind(name: str) -> LayerKindSpec | None:
    """The kind registered under ``name``, or ``None``."""
    return _KINDS.get(name)


def kind_of(module: nn.Module) -> LayerKindSpec | None:
    """The kind ``module`` belongs to, or ``None`` if it cannot carry seeds.

    The kind of the most specific class in ``type(module).__mro__`` wins (a kind registered for
    a subclass of ``nn.Linear`` takes its modules from ``linear``); a module of no registered
    class is offered to the kinds' predicates in registration order.
    """
    kinds = registered_layer_kinds()
    for cls in type(module).__mro__:
        for spec in kinds:
            if spec.covers_class(cls):
                return spec
    for spec in kinds:
        if spec.matches is not None and _matches(spec, spec.matches, module):
            return spec
    return None


def _matches(spec: LayerKindSpec, predicate: MatchFn, module: nn.Module) -> bool:
    try:
        return bool(predicate(module))
    except Exception as exc:
        raise ConfigurationError(
            f"layer kind {spec.name!r}: its matches predicate raised {type(exc).__name__} on a "
            f"{type(module).__name__}: {exc}; it must return True or False for any module"
        ) from exc


def feature_kind(name: str) -> str | None:
    """The kind of :data:`FEATURE_KINDS` whose structural column a layer of kind ``name`` sets."""
    if name in FEATURE_KINDS:
        return name
    spec = _KINDS.get(name)
    return spec.like if spec is not None else None


def supported_layer_names() -> str:
    """The classes every registered kind covers, for error messages."""
    return "; ".join(f"{spec.name}: {spec.describe()}" for spec in _KINDS.values())
