"""``unwrap()`` returns plain PyTorch (issue 9, item 3): over every layer kind and blueprint
family, no module of the result has a class from ``esper``, outputs equal the morphed model's
(exactly, or up to rounding where kernels were merged into the host's weights), and the result
loads and runs in a process where Esper cannot be imported."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import fx, nn

import esper
from esper.blueprints import is_compatible
from esper.contracts import BlueprintSpec
from esper.core.unwrap import FROZEN_KERNELS
from esper.execution import InMemoryArtifactSource
from esper.execution.layer_kinds import profile_layer

Germinate = Callable[..., nn.Module]


class Attention(nn.Module):
    """Self-attention as a model: ``attn(x, x, x)[0]``."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x)[0]


@dataclass(frozen=True)
class Kind:
    """A host whose layer ``layer`` carries the seeds, and an input for it."""

    name: str
    make: Callable[[], nn.Module]
    layer: str
    input_shape: tuple[int, ...]


KINDS = [
    Kind("linear", lambda: nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6)), "2", (4, 5)),
    Kind("conv1d", lambda: nn.Sequential(nn.Conv1d(3, 6, 3, stride=2)), "0", (2, 3, 11)),
    Kind("conv2d", lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), "0", (2, 3, 5, 5)),
    Kind("conv2d_grouped", lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), "0", (2, 4, 5, 5)),
    Kind("layer_norm", lambda: nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6)), "1", (3, 4, 5)),
    Kind("batch_norm1d", lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)), "1", (7, 5)),
    Kind("batch_norm2d", lambda: nn.Sequential(nn.BatchNorm2d(3)), "0", (2, 3, 4, 4)),
    Kind("multihead_attention", Attention, "attn", (2, 5, 8)),
]

SPECS = {
    "lowrank_linear": BlueprintSpec(family="lowrank_adapter", params={"rank": 2, "bias": True}),
    "lowrank_relu": BlueprintSpec(
        family="lowrank_adapter", params={"rank": 2, "activation": "relu"}
    ),
    "residual_mlp": BlueprintSpec(family="residual_mlp", params={"hidden": 6}),
    "residual_mlp_norm": BlueprintSpec(family="residual_mlp", params={"hidden": 6, "norm": True}),
    "conv_pointwise_linear": BlueprintSpec(
        family="conv_adapter", params={"hidden": 3, "activation": "identity"}
    ),
    "conv_pointwise": BlueprintSpec(family="conv_adapter", params={"hidden": 3}),
    "conv_depthwise": BlueprintSpec(family="conv_adapter", params={"mode": "depthwise"}),
}

MERGEABLE = {
    ("linear", "lowrank_linear"),
    ("conv1d", "lowrank_linear"),
    ("conv2d", "lowrank_linear"),
    ("conv1d", "conv_pointwise_linear"),
    ("conv2d", "conv_pointwise_linear"),
    ("multihead_attention", "lowrank_linear"),
}
"""Linear maps over the channels a linear host computes: merged into the host's weights."""


def _layer_of(kind: Kind) -> nn.Module:
    return dict(kind.make().named_modules())[kind.layer]


CASES = [
    pytest.param(kind, spec_name, id=f"{kind.name}-{spec_name}")
    for kind in KINDS
    for spec_name, spec in SPECS.items()
    if is_compatible(
        spec,
        profile_layer(_layer_of(kind)).target(dtype="float32", device="cpu"),  # type: ignore[union-attr]
    )
]


def _grown(
    kind: Kind, spec: BlueprintSpec, source: InMemoryArtifactSource, germinate: Germinate
) -> esper.MorphableModel:
    """Seed 0 FOSSILIZED at alpha 1, seed 1 ACTIVE at alpha 0.4."""
    torch.manual_seed(0)
    model = esper.wrap(kind.make(), kind.layer, seeds_per_layer=2, kernel_source=source)
    model.layer(kind.layer).blend_steps = 1
    germinate(model, kind.layer, 0, spec)
    germinate(model, kind.layer, 1, spec)
    model.step()
    model.fossilize(kind.layer, seed_idx=0)
    model.set_seed_alpha(kind.layer, seed_idx=1, alpha=0.4)
    return model


def _esper_classes(model: nn.Module) -> list[str]:
    return [type(m).__qualname__ for m in model.modules() if type(m).__module__.startswith("esper")]


@pytest.mark.parametrize(("kind", "spec_name"), CASES)
def test_unwrap_gives_torch_classes_computing_the_same_function(
    source: InMemoryArtifactSource, germinate: Germinate, kind: Kind, spec_name: str
) -> None:
    model = _grown(kind, SPECS[spec_name], source, germinate).eval()
    original = _layer_of(kind)
    x = torch.randn(kind.input_shape)

    plain = esper.unwrap(model).eval()

    layer = dict(plain.named_modules())[kind.layer]
    assert _esper_classes(plain) == []
    assert type(layer) is type(original)  # the host keeps its class and its attributes
    with torch.no_grad():
        expected, unwrapped = model(x), plain(x)
    merged = (kind.name, spec_name) in MERGEABLE
    assert (FROZEN_KERNELS in layer._modules) is not merged
    if merged:  # the kernels are in the host's weights: its own parameters, nothing else
        assert {n for n, _ in layer.named_parameters()} <= {
            n for n, _ in original.named_parameters()
        } | {"bias", "out_proj.bias"}
        assert torch.allclose(unwrapped, expected, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(unwrapped, expected)
    assert not torch.allclose(unwrapped, kind.make().eval()(x), atol=1e-3)  # kernels are kept


@pytest.mark.parametrize(("kind", "spec_name"), CASES)
def test_unwrapped_kernels_train_like_the_grafted_ones(
    source: InMemoryArtifactSource, germinate: Germinate, kind: Kind, spec_name: str
) -> None:
    model = _grown(kind, SPECS[spec_name], source, germinate).train()
    plain = esper.unwrap(model).train()
    x = torch.randn(kind.input_shape)

    expected, unwrapped = model(x), plain(x)
    unwrapped.square().sum().backward()

    assert torch.allclose(unwrapped, expected, atol=1e-5, rtol=1e-5)
    layer = dict(plain.named_modules())[kind.layer]
    assert all(p.grad is not None for p in layer.parameters())  # kept kernels are trainable


class Everything(nn.Module):
    """Every layer kind in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm2d = nn.BatchNorm2d(4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.conv1d = nn.Conv1d(1, 2, 3)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm2d(self.conv(x)).flatten(2).transpose(1, 2)  # (N, H*W, 4)
        h = self.norm(h + self.attn(h, h, h)[0]).mean(dim=1)  # (N, 4)
        h = self.bn(self.fc(h))  # (N, 6)
        h = self.conv1d(h.unsqueeze(1)).flatten(1)  # (N, 8)
        return self.out(h)


def _everything_grown(source: InMemoryArtifactSource, germinate: Germinate) -> esper.MorphableModel:
    torch.manual_seed(0)
    host = fx.symbolic_trace(Everything())  # a torch class at the root too, so it pickles alone
    for node in host.graph.nodes:
        node.type = None  # this file's annotations are strings, which fx cannot pickle
    host.recompile()
    model = esper.wrap(host, seeds_per_layer=1, kernel_source=source)
    for name, spec in [
        ("conv", SPECS["conv_depthwise"]),
        ("norm2d", SPECS["conv_pointwise"]),
        ("attn", SPECS["residual_mlp"]),
        ("norm", SPECS["residual_mlp_norm"]),
        ("fc", SPECS["lowrank_linear"]),  # merged
        ("bn", SPECS["lowrank_relu"]),
        ("conv1d", SPECS["residual_mlp_norm"]),
    ]:
        germinate(model, name, 0, spec)
        model.set_seed_alpha(name, seed_idx=0, alpha=0.7)
    return model.eval()


_LOAD_WITHOUT_ESPER = textwrap.dedent(
    """
    import importlib.abc
    import sys

    class NoEsper(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "esper" or name.startswith("esper."):
                raise ModuleNotFoundError(f"esper is not installed here ({name})")
            return None

    sys.meta_path.insert(0, NoEsper())
    import torch

    folder = sys.argv[1]
    model = torch.load(f"{folder}/model.pt", weights_only=False).eval()
    data = torch.load(f"{folder}/data.pt", weights_only=True)
    with torch.no_grad():
        # another process may pick other CPU kernels (thread count): equal up to rounding
        assert torch.allclose(model(data["x"]), data["expected"], atol=1e-6), "outputs differ"
    model.load_state_dict(torch.load(f"{folder}/state.pt", weights_only=True))
    assert not any(type(m).__module__.startswith("esper") for m in model.modules())
    assert not any(name.startswith("esper") for name in sys.modules)
    print("loaded without esper:", len(list(model.modules())), "modules")
    """
)


def test_an_unwrapped_model_loads_and_runs_where_esper_cannot_be_imported(
    source: InMemoryArtifactSource, germinate: Germinate, tmp_path: Path
) -> None:
    model = _everything_grown(source, germinate)
    plain = esper.unwrap(model).eval()
    x = torch.randn(3, 2, 4, 4)
    with torch.no_grad():
        expected = plain(x)
        assert torch.allclose(expected, model(x), atol=1e-5)
    assert _esper_classes(plain) == []
    torch.save(plain, tmp_path / "model.pt")  # the whole module (pickled): this test only
    torch.save({"x": x, "expected": expected}, tmp_path / "data.pt")
    torch.save(plain.state_dict(), tmp_path / "state.pt")

    result = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_ESPER, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert "loaded without esper" in result.stdout


def test_a_copy_of_an_unwrapped_model_keeps_its_kernels(
    source: InMemoryArtifactSource, germinate: Germinate
) -> None:
    plain = esper.unwrap(_everything_grown(source, germinate)).eval()
    x = torch.randn(2, 2, 4, 4)

    copied = copy.deepcopy(plain)

    with torch.no_grad():
        assert torch.equal(copied(x), plain(x))
    assert copied.attn.frozen_kernels is not plain.attn.frozen_kernels
    assert list(copied.attn._forward_hooks.values()) == [copied.attn.frozen_kernels]


PADDING = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])


def _encoder() -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).eval()


def test_an_unwrapped_transformer_encoder_runs_every_kept_kernel(
    source: InMemoryArtifactSource, germinate: Germinate
) -> None:
    model = esper.wrap(_encoder(), kernel_source=source).eval()
    for name, spec in [
        ("layers.0.linear1", SPECS["residual_mlp"]),
        ("layers.0.self_attn", SPECS["lowrank_linear"]),  # merged into out_proj
        ("layers.1.norm2", SPECS["lowrank_relu"]),
    ]:
        germinate(model, name, 0, spec)
        model.set_seed_alpha(name, seed_idx=0, alpha=1.0)
    x = torch.randn(2, 5, 16)

    plain = esper.unwrap(model).eval()

    assert _esper_classes(plain) == []
    assert type(plain.layers[0].self_attn) is nn.MultiheadAttention
    assert plain.use_nested_tensor is False  # nested tensors cannot run the kept kernels
    real = PADDING.logical_not()
    with torch.no_grad():  # eval + no_grad: the fused and nested paths would be eligible
        expected = model(x, src_key_padding_mask=PADDING)
        unwrapped = plain(x, src_key_padding_mask=PADDING)
    assert torch.allclose(unwrapped[real], expected[real], atol=1e-5)


def test_a_transformer_encoder_with_only_merged_kernels_keeps_its_fast_paths(
    source: InMemoryArtifactSource, germinate: Germinate
) -> None:
    model = esper.wrap(_encoder(), kernel_source=source).eval()
    germinate(model, "layers.1.linear2", 0, SPECS["lowrank_linear"])
    model.set_seed_alpha("layers.1.linear2", seed_idx=0, alpha=1.0)
    x = torch.randn(2, 5, 16)

    plain = esper.unwrap(model).eval()

    assert plain.use_nested_tensor is True
    assert not any(m._forward_hooks for m in plain.modules())
    with torch.no_grad():
        expected = model(x, src_key_padding_mask=PADDING)
        unwrapped = plain(x, src_key_padding_mask=PADDING)
    assert torch.allclose(unwrapped, expected, atol=1e-5)


def test_a_kept_kernel_reads_an_input_passed_by_keyword(
    source: InMemoryArtifactSource, germinate: Germinate
) -> None:
    class KeywordCaller(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(input=x)

    torch.manual_seed(0)
    model = esper.wrap(KeywordCaller(), kernel_source=source)
    germinate(model, "fc", 0, SPECS["residual_mlp"])
    model.set_seed_alpha("fc", seed_idx=0, alpha=1.0)
    x = torch.randn(3, 5)

    plain = esper.unwrap(model)

    assert FROZEN_KERNELS in plain.fc._modules
    assert torch.equal(plain(x), model(x))
    assert torch.equal(plain.fc(x), plain(x))  # by position too
