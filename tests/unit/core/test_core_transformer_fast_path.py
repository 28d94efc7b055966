"""An active seed inside nn.TransformerEncoderLayer in eval mode really contributes: PyTorch's
fused inference path, which reads the children's weights directly, must not silently drop it."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import esper
from esper.execution import InMemoryArtifactSource

Germinate = Callable[..., nn.Module]


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of PyTorch's fused encoder-layer kernel (the real one still runs)."""
    fused = torch._transformer_encoder_layer_fwd
    calls: list[int] = []

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counting)
    return calls


def _encoder_layer() -> nn.TransformerEncoderLayer:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(
        d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True
    ).eval()


@pytest.mark.parametrize("layer_name", ["linear2", "self_attn", "norm1"])
def test_an_active_seed_contributes_in_eval_inference(
    source: InMemoryArtifactSource,
    germinate: Germinate,
    fused_calls: list[int],
    layer_name: str,
) -> None:
    plain = _encoder_layer()
    model = esper.wrap(copy.deepcopy(plain), kernel_source=source).eval()
    germinate(model, layer_name, 0)
    model.set_seed_alpha(layer_name, seed_idx=0, alpha=1.0)
    x = torch.randn(3, 5, 16)

    with torch.no_grad():
        inference = model(x)  # eval + no_grad: the fused path would be eligible
        baseline = plain(x)
    reference = model(x)  # grad enabled: PyTorch's unfused path, which calls every child

    assert len(fused_calls) == 1  # only the plain model took the fused path
    assert torch.allclose(inference, reference.detach(), atol=1e-6)
    assert not torch.allclose(inference, baseline, atol=1e-3)


def test_the_fused_path_returns_once_the_seed_is_culled(
    source: InMemoryArtifactSource, germinate: Germinate, fused_calls: list[int]
) -> None:
    plain = _encoder_layer()
    model = esper.wrap(copy.deepcopy(plain), kernel_source=source).eval()
    germinate(model, "linear1", 2)
    x = torch.randn(2, 4, 16)
    with torch.no_grad():
        model(x)
    assert fused_calls == []

    model.unload_kernel("linear1", seed_idx=2)
    with torch.no_grad():
        culled = model(x)
        expected = plain(x)

    assert len(fused_calls) == 2
    assert torch.equal(culled, expected)
