"""Host factories: output shapes, exact parameter counts, seedable layer names, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import esper
from esper.errors import ConfigurationError
from esper.tasks.hosts import ConvNet, TinyTransformer, build_host, build_mlp


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_mlp_has_named_layers_and_the_expected_parameter_count() -> None:
    mlp = build_mlp(64, 10, hidden=[16, 8])

    assert [name for name, _ in mlp.named_children()] == ["fc1", "act1", "fc2", "act2", "out"]
    assert _count(mlp) == (64 * 16 + 16) + (16 * 8 + 8) + (8 * 10 + 10)
    assert mlp(torch.randn(5, 64)).shape == (5, 10)


def test_an_identity_activation_makes_a_linear_network() -> None:
    torch.manual_seed(0)
    mlp = build_mlp(6, 3, hidden=[4], activation="identity")
    x, y = torch.randn(2, 6), torch.randn(2, 6)

    # a linear map: f(x + y) - f(0) == f(x) - f(0) + f(y) - f(0)
    zero = mlp(torch.zeros(1, 6))
    assert torch.allclose(mlp(x + y) - zero, (mlp(x) - zero) + (mlp(y) - zero), atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 40), (1, 8, 8)])
def test_cnn_reads_flat_examples_in_its_layout(shape: tuple[int, ...]) -> None:
    cnn = ConvNet(shape, 10, channels=[4, 6], kernel_size=3)
    features = 1
    for d in shape:
        features *= d
    conv = nn.Conv1d if len(shape) == 2 else nn.Conv2d

    assert cnn(torch.randn(3, features)).shape == (3, 10)
    assert isinstance(cnn.features.conv1, conv)
    kernel_elems = 3 ** (len(shape) - 1)
    assert _count(cnn) == (1 * 4 * kernel_elems + 4) + (4 * 6 * kernel_elems + 6) + (6 * 10 + 10)


def test_transformer_tokens_are_patches() -> None:
    model = TinyTransformer(64, 10, patch=8, d_model=16, heads=2, depth=2, ff=32)

    assert model.tokens == 8
    assert model(torch.randn(4, 64)).shape == (4, 10)


def test_every_host_kind_wraps_with_readable_layer_names() -> None:
    mlp = esper.wrap(build_mlp(64, 10, hidden=[16]), target_layers=[nn.Linear])
    cnn = esper.wrap(ConvNet((1, 40), 10, channels=[4]), target_layers=[nn.Conv1d, nn.Linear])
    transformer = esper.wrap(
        TinyTransformer(64, 10, patch=8, d_model=16, heads=2, depth=1, ff=32),
        target_layers=[".ff1", ".ff2", ".attn"],
    )

    assert mlp.layer_names == ["fc1", "out"]
    assert cnn.layer_names == ["features.conv1", "head"]
    assert transformer.layer_names == ["blocks.0.attn", "blocks.0.ff1", "blocks.0.ff2"]


def test_dormant_wrapped_transformer_is_exact() -> None:
    torch.manual_seed(0)
    host = TinyTransformer(64, 10, patch=8, d_model=16, heads=2, depth=2, ff=32)
    wrapped = esper.wrap(host, target_layers=[".ff1", ".ff2", ".attn", ".ln1"])
    x = torch.randn(5, 64)

    host.eval()
    wrapped.eval()
    assert torch.equal(wrapped(x), host(x))


def test_build_host_dispatches_and_rejects_unknown_kinds_and_options() -> None:
    assert isinstance(build_host("mlp", in_features=4, out_features=2), nn.Sequential)
    with pytest.raises(ConfigurationError, match="choose one of mlp, cnn, transformer"):
        build_host("rnn", in_features=4, out_features=2)
    with pytest.raises(ConfigurationError, match="host 'mlp' got an invalid option"):
        build_host("mlp", in_features=4, out_features=2, options={"width": 3})
    with pytest.raises(ConfigurationError, match="needs an example layout"):
        build_host("cnn", in_features=4, out_features=2)
    with pytest.raises(ConfigurationError, match="patch"):
        build_host("transformer", in_features=10, out_features=2, options={"patch": 3})
