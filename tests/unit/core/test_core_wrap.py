"""esper.wrap: choosing target layers (type, name, .suffix, regex, mixes), errors that list
candidates, shared modules, deep copy by default, and wrap/unwrap argument checks."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import esper
from esper.blueprints import create_artifact
from esper.contracts import BlueprintSpec
from esper.core.model_wrapper import TargetSpec
from esper.errors import ConfigurationError, UnknownLayerError
from esper.execution import InMemoryArtifactSource, KasminaLayer, KernelCache


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Block()
        self.decoder = Block()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.rnn = nn.GRU(8, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.decoder(self.encoder(x))  # (N, T, 8)
        h = self.attn(h, h, h)[0]
        h, _ = self.rnn(h)
        return self.head(h[:, -1])


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (
            None,
            [
                "encoder.fc1",
                "encoder.norm",
                "encoder.fc2",
                "decoder.fc1",
                "decoder.norm",
                "decoder.fc2",
                "attn",
                "head",
            ],
        ),
        (nn.LayerNorm, ["encoder.norm", "decoder.norm"]),
        (nn.MultiheadAttention, ["attn"]),
        ("encoder.fc1", ["encoder.fc1"]),
        (".fc2", ["encoder.fc2", "decoder.fc2"]),
        ("fc2", ["encoder.fc2", "decoder.fc2"]),
        (re.compile(r"decoder\.fc\d"), ["decoder.fc1", "decoder.fc2"]),
        (
            [nn.LayerNorm, "head", re.compile(r"encoder\.fc1")],
            ["encoder.fc1", "encoder.norm", "decoder.norm", "head"],
        ),
        (["head", "head", nn.MultiheadAttention], ["attn", "head"]),
    ],
    ids=["all", "type", "attention", "name", "suffix", "bare_suffix", "regex", "mix", "dupes"],
)
def test_target_selection(
    targets: TargetSpec | list[TargetSpec] | None, expected: list[str]
) -> None:
    model = esper.wrap(_net(), targets)

    assert model.layer_names == expected
    assert sorted(model.layers) == sorted(expected)
    wrapped = [n for n, m in model.model.named_modules() if isinstance(m, KasminaLayer)]
    assert wrapped == expected


def test_a_regex_must_match_the_full_name() -> None:
    with pytest.raises(UnknownLayerError):
        esper.wrap(_net(), re.compile(r"fc1"))


def test_attention_out_proj_is_never_wrapped() -> None:
    model = esper.wrap(_net(), nn.Linear)

    assert "attn.out_proj" not in model.layers
    assert not isinstance(model.model.attn.out_proj, KasminaLayer)
    assert isinstance(model.model.attn, nn.MultiheadAttention)  # not targeted by nn.Linear
    with pytest.raises(ConfigurationError, match="part of a MultiheadAttention"):
        esper.wrap(_net(), "attn.out_proj")


def test_unknown_name_lists_candidates() -> None:
    with pytest.raises(UnknownLayerError, match=r"'encoder\.fc3' matches no module") as info:
        esper.wrap(_net(), "encoder.fc3")

    message = str(info.value)
    assert "Did you mean" in message
    assert "'encoder.fc1'" in message
    assert "encoder.norm" in message and "head" in message  # the candidates that can carry seeds
    assert "rnn" not in message.split("Layers that can carry seeds:")[1]


def test_a_named_unsupported_layer_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="'rnn' cannot carry seeds: it is a GRU") as info:
        esper.wrap(_net(), ["head", "rnn"])
    assert "Linear" in str(info.value)


def test_a_type_with_no_instances_is_an_error() -> None:
    with pytest.raises(UnknownLayerError, match="no layer of the model matches"):
        esper.wrap(_net(), nn.Conv2d)


@pytest.mark.parametrize("selector", [42, nn.Linear(2, 2), int])
def test_invalid_selectors_are_configuration_errors(selector: object) -> None:
    with pytest.raises(ConfigurationError):
        esper.wrap(_net(), [selector])  # type: ignore[list-item]


def test_a_shared_module_is_wrapped_once_under_all_its_names() -> None:
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    expected = model(x)

    wrapped = esper.wrap(model)

    assert wrapped.layer_names == ["0"]
    assert set(wrapped.layers) == {"0", "2"}
    assert wrapped.layer("0") is wrapped.layer("2")
    assert wrapped.model[0] is wrapped.model[2]
    assert torch.equal(wrapped(x), expected)
    assert len(list(wrapped.parameters())) == 2  # one weight, one bias: still shared
    assert len(wrapped.stats().layers) == 1


def test_wrap_deep_copies_by_default() -> None:
    original = _net()
    before = {k: v.clone() for k, v in original.state_dict().items()}

    wrapped = esper.wrap(original)
    with torch.no_grad():
        wrapped.layer("head").base.weight.add_(1.0)

    assert wrapped.model is not original
    assert wrapped.layer("head").base is not original.head
    assert isinstance(original.head, nn.Linear)
    assert not any(isinstance(m, KasminaLayer) for m in original.modules())
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_inplace_wrap_modifies_the_model_itself() -> None:
    original = _net()
    head = original.head

    wrapped = esper.wrap(original, "head", inplace=True)

    assert wrapped.model is original
    assert isinstance(original.head, KasminaLayer)
    assert original.head.base is head


def test_settings_reach_every_layer() -> None:
    model = esper.wrap(
        _net(),
        nn.Linear,
        seeds_per_layer=3,
        blend_steps=7,
        max_retries=5,
        retry_backoff_steps=2,
        health_every=4,
    )

    for layer in model.layers.values():
        assert layer.num_seeds == 3
        assert (layer.blend_steps, layer.max_retries) == (7, 5)
        assert (layer.retry_backoff_steps, layer.health_every) == (2, 4)


def test_one_cache_is_shared_by_every_layer_and_can_be_shared_between_models() -> None:
    cache = KernelCache()
    first = esper.wrap(_net(), kernel_cache=cache)
    second = esper.wrap(_net(), kernel_cache=cache)
    own = esper.wrap(_net())

    assert first.kernel_cache is cache and second.kernel_cache is cache
    assert all(layer._cache is cache for layer in first.layers.values())
    assert own.kernel_cache is not cache
    assert all(layer._cache is own.kernel_cache for layer in own.layers.values())
    cache.close()


def test_wrapping_twice_or_bad_settings_are_refused() -> None:
    wrapped = esper.wrap(_net())

    with pytest.raises(ConfigurationError, match="already wrapped"):
        esper.wrap(wrapped)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="seeds_per_layer"):
        esper.wrap(_net(), seeds_per_layer=0)
    with pytest.raises(ConfigurationError, match="MorphableModel"):
        esper.unwrap(_net())  # type: ignore[arg-type]


def test_a_model_that_is_itself_a_supported_layer() -> None:
    layer = nn.Linear(4, 2)

    with pytest.raises(UnknownLayerError):
        esper.wrap(layer)  # the root has no name to address it by


def test_a_kernel_in_a_shared_module_runs_at_every_site() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    source = InMemoryArtifactSource()
    wrapped = esper.wrap(nn.Sequential(shared, nn.Tanh(), shared), kernel_source=source)
    data, _ = create_artifact(
        BlueprintSpec(family="lowrank_adapter", params={"rank": 2}), wrapped.layer("2").target()
    )
    kernel = wrapped.load_kernel_sync("2", seed_idx=0, kernel_artifact_id=source.add(data))
    with torch.no_grad():
        for p in kernel.parameters():
            p.normal_(0.0, 0.3)
    wrapped.set_seed_alpha("2", seed_idx=0, alpha=1.0)
    x = torch.randn(3, 8)

    def grown(u: torch.Tensor) -> torch.Tensor:
        return wrapped.layer("0").base(u) + kernel(u)

    assert torch.allclose(wrapped(x), grown(torch.tanh(grown(x))), atol=1e-6)
