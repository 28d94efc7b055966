"""The layer-kind registry: a user's own kind works end to end, built-ins go through the same
registry, a module's kind is its most specific registered class, and bad registrations are
refused with a message that names the problem."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import esper
from esper.blueprints import create_artifact
from esper.contracts import BlueprintSpec, LayerKind
from esper.errors import ArgumentTypeError, ConfigurationError, UnknownLayerError
from esper.execution import (
    GraftPoint,
    InMemoryArtifactSource,
    LayerGeometry,
    kind_of,
    profile_layer,
    register_layer_kind,
    registered_layer_kinds,
    unregister_layer_kind,
)
from esper.execution.layer_kind_registry import FEATURE_KINDS, feature_kind
from esper.tamiyo.graph import GraphStructure
from esper.tamiyo.observation import NODE_FEATURES


class Gate(nn.Module):
    """A user's layer: ``x * sigmoid(g)``, returned with the gate as a tuple."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.randn(width))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = torch.sigmoid(self.g)
        return x * gate, gate


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.gate = Gate(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.gate(self.inp(x))
        return self.out(h) + gate.sum()


@pytest.fixture
def kinds() -> Iterator[list[str]]:
    """Names registered by a test; unregistered afterwards (the registry is process-wide)."""
    names: list[str] = []
    yield names
    for name in names:
        unregister_layer_kind(name)


def _register_gate(kinds: list[str]) -> None:
    register_layer_kind(
        "gate",
        module_types=[Gate],
        geometry=lambda m: LayerGeometry(m.g.numel(), m.g.numel()),
        reads="output",
        returns_tuple=True,
    )
    kinds.append("gate")


def test_a_user_kind_carries_seeds_dormant_exact_and_grafted_as_declared(
    kinds: list[str],
) -> None:
    _register_gate(kinds)
    torch.manual_seed(0)
    plain = GatedNet()
    source = InMemoryArtifactSource()
    model = esper.wrap(plain, target_layers=[Gate], seeds_per_layer=1, kernel_source=source)
    x = torch.randn(5, 6)
    assert model.layer_names == ["gate"]
    assert torch.equal(model(x), plain(x))

    spec = BlueprintSpec(family="lowrank_adapter", params={"rank": 2})
    data, meta = create_artifact(spec, model.layer("gate").target())
    assert meta.target.layer_kind == "gate"
    kernel = model.load_kernel_sync("gate", seed_idx=0, kernel_artifact_id=source.add(data))
    with torch.no_grad():
        for p in kernel.parameters():
            p.normal_(0.0, 0.3)
    model.set_seed_alpha("gate", seed_idx=0, alpha=0.5)

    h = plain.inp(x)
    gated, gate = plain.gate(h)  # the kernel reads the tuple's first element and adds to it
    down, up = kernel.down.weight, kernel.up.weight  # (2, 8), (8, 2)
    expected = plain.out(gated + 0.5 * F.linear(F.linear(gated, down), up)) + gate.sum()
    assert torch.allclose(model(x), expected, atol=1e-6)


def test_an_input_reading_user_kind_with_a_predicate_and_a_dotted_path(kinds: list[str]) -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.full((4,), 2.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.s

    register_layer_kind(
        "scale",
        matches=lambda m: hasattr(m, "s") and not list(m.children()),
        geometry=lambda m: LayerGeometry(4, 4),
    )
    kinds.append("scale")
    register_layer_kind(
        "gate_by_path",
        module_types=[f"{Gate.__module__}.{Gate.__qualname__}"],
        geometry=lambda m: LayerGeometry(m.g.numel(), m.g.numel()),
        reads="output",
        returns_tuple=True,
    )
    kinds.append("gate_by_path")

    scale = profile_layer(Scale())
    assert scale is not None and (scale.kind, scale.graft_point) == ("scale", GraftPoint.INPUT)
    assert kind_of(Gate(3)).name == "gate_by_path"  # type: ignore[union-attr]
    model = esper.wrap(nn.Sequential(Scale(), nn.ReLU()), target_layers="kind:scale")
    assert model.layer_names == ["0"]


def test_the_built_in_kinds_are_ordinary_registrations() -> None:
    names = [spec.name for spec in registered_layer_kinds()]
    assert set(LayerKind) <= set(names)

    spec = unregister_layer_kind("embedding")
    try:
        assert kind_of(nn.Embedding(5, 4)) is None
        with pytest.raises(ConfigurationError, match="Embedding, which cannot carry seeds"):
            esper.KasminaLayer(nn.Embedding(5, 4))
    finally:
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
        types = [*fields.pop("module_types"), *fields.pop("type_paths")]
        register_layer_kind(fields.pop("name"), module_types=types, **fields)
    assert kind_of(nn.Embedding(5, 4)).name == "embedding"  # type: ignore[union-attr]


def test_the_most_specific_registered_class_wins(kinds: list[str]) -> None:
    class MyLinear(nn.Linear):
        pass

    register_layer_kind(
        "my_linear",
        module_types=[MyLinear],
        geometry=lambda m: LayerGeometry(m.in_features, m.out_features),
    )
    kinds.append("my_linear")

    assert kind_of(MyLinear(3, 2)).name == "my_linear"  # type: ignore[union-attr]
    assert kind_of(nn.Linear(3, 2)).name == "linear"  # type: ignore[union-attr]
    attention = nn.MultiheadAttention(8, 2)  # its out_proj is a Linear subclass
    assert kind_of(attention).name == "multihead_attention"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"name": "linear", "module_types": [Gate]}, ConfigurationError, "already registered"),
        ({"module_types": [nn.Linear]}, ConfigurationError, "Linear already belongs to layer kind"),
        ({"name": "Bad-Name"}, ConfigurationError, "must match"),
        ({"module_types": []}, ConfigurationError, "covers no module"),
        ({"reads": "middle"}, ConfigurationError, "reads must be 'input' or 'output'"),
        ({"merge": "magic"}, ConfigurationError, "unknown merge rule 'magic'"),
        ({"like": "gru"}, ConfigurationError, "like must be one of"),
        ({"module_types": "Gate"}, ArgumentTypeError, "must be a list of classes"),
        ({"module_types": [int]}, ArgumentTypeError, "nn.Module subclasses or dotted paths"),
        ({"geometry": (4, 4)}, ArgumentTypeError, "geometry must be a function"),
    ],
    ids=[
        "duplicate-name",
        "duplicate-type",
        "bad-name",
        "covers-nothing",
        "reads",
        "merge",
        "like",
        "types-not-a-list",
        "not-a-module",
        "geometry-not-callable",
    ],
)
def test_bad_registrations_are_refused_and_change_nothing(
    arguments: dict[str, object], error: type[Exception], message: str
) -> None:
    before = registered_layer_kinds()
    call: dict[str, object] = {
        "name": "fresh",
        "module_types": [Gate],
        "geometry": lambda m: LayerGeometry(2, 2),
        **arguments,
    }
    with pytest.raises(error, match=message):
        register_layer_kind(**call)  # type: ignore[arg-type]
    assert registered_layer_kinds() == before


@pytest.mark.parametrize(
    ("geometry", "message"),
    [
        (lambda m: (8, 8), "returned tuple, not a LayerGeometry"),
        (lambda m: LayerGeometry(8, 0), "widths must be >= 1"),
        (lambda m: LayerGeometry(8, 8, channel_dim=2), "channel_dim must be -1 or 1"),
        (lambda m: LayerGeometry(8, 8, spatial_dims=2), "spatial_dims must be 0 with features"),
        (lambda m: m.missing, "geometry function raised AttributeError"),
    ],
    ids=["not-a-geometry", "zero-width", "channel-dim", "spatial", "raises"],
)
def test_a_bad_geometry_is_reported_at_wrap_with_the_kind_named(
    kinds: list[str], geometry: object, message: str
) -> None:
    register_layer_kind("gate", module_types=[Gate], geometry=geometry)  # type: ignore[arg-type]
    kinds.append("gate")

    with pytest.raises(ConfigurationError, match=f"layer kind 'gate' on Gate.*{message}"):
        esper.wrap(GatedNet(), target_layers=[Gate])


def test_a_predicate_that_raises_is_reported_with_the_kind_named(kinds: list[str]) -> None:
    register_layer_kind("picky", matches=lambda m: m.nonexistent, geometry=lambda m: None)  # type: ignore[arg-type,return-value]
    kinds.append("picky")

    with pytest.raises(ConfigurationError, match="layer kind 'picky': its matches predicate"):
        esper.wrap(nn.Sequential(nn.ReLU()))


def test_kind_selectors_pick_every_layer_of_a_kind_and_unknown_kinds_are_named() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.RMSNorm(8), nn.Linear(8, 8), nn.RMSNorm(8))

    wrapped = esper.wrap(model, target_layers=["kind:rms_norm", "kind:embedding"])
    assert wrapped.layer_names == ["0", "1", "3"]
    with pytest.raises(UnknownLayerError, match="Did you mean 'kind:rms_norm'"):
        esper.wrap(model, target_layers="kind:rmsnorm")


def test_every_kind_sets_a_tamiyo_structure_column_its_own_or_the_one_it_is_like() -> None:
    assert [f"kind_{kind}" for kind in FEATURE_KINDS] == [
        name for name in NODE_FEATURES if name.startswith("kind_")
    ]
    assert feature_kind("hf_conv1d") == "linear"
    assert feature_kind("rms_norm") == "layer_norm"
    assert feature_kind("embedding") == "linear"
    assert feature_kind("conv2d") == "conv2d"
    assert feature_kind("not_registered") is None


def test_tamiyo_sees_stock_and_user_kinds_in_its_layer_graph(kinds: list[str]) -> None:
    _register_gate(kinds)
    model = esper.wrap(
        nn.Sequential(nn.Embedding(10, 8), nn.RMSNorm(8), Gate(8)),
        target_layers=["kind:embedding", "kind:rms_norm", "kind:gate"],
    )

    structure = GraphStructure.from_model(model)

    kind_columns = [i for i, name in enumerate(NODE_FEATURES) if name.startswith("kind_")]
    one_hot = structure.static_features[:, kind_columns]  # (3 layers, 7 kinds)
    linear, layer_norm = FEATURE_KINDS.index("linear"), FEATURE_KINDS.index("layer_norm")
    assert one_hot[0].nonzero().flatten().tolist() == [linear]  # embedding: like linear
    assert one_hot[1].nonzero().flatten().tolist() == [layer_norm]  # rms_norm: like layer_norm
    assert one_hot[2].sum() == 0  # a user kind registered without `like`
    assert structure.compatible[:, 0].all()  # lowrank_r8 fits every one of them
