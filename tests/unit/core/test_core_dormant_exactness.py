"""Invariant 1: a wrapped model with every seed dormant is bit-identical to the original, in train
and eval, forward and backward, on every supported layer type; base modules are kept as they are."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import esper
from esper.execution import KasminaLayer


class ResidualCNN(nn.Module):
    """Conv2d + BatchNorm2d with a residual add, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)  # (N, 8, H, W)
        h = h + torch.relu(self.bn(self.conv(h)))
        return self.head(h.mean(dim=(2, 3)))  # (N, 5)


class RecurrentHead(nn.Module):
    """A GRU (not seedable) feeding a Linear (seedable)."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(6, 12, batch_first=True)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)  # (N, T, 12)
        return self.fc(out[:, -1])


class SelfAttention(nn.Module):
    """A bare MultiheadAttention; returns its output and its attention weights."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, weights = self.attn(self.proj(x), x, x)
        return out, weights


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    wrapped_layers: tuple[str, ...]


CASES = [
    Case(
        "mlp",
        lambda: nn.Sequential(
            nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4)
        ),
        (6, 10),
        ("0", "2", "4"),
    ),
    Case("residual_cnn", ResidualCNN, (4, 3, 8, 8), ("stem", "conv", "bn", "head")),
    Case(
        "transformer_encoder_layer",
        lambda: nn.TransformerEncoderLayer(
            d_model=16, nhead=2, dim_feedforward=32, dropout=0.1, batch_first=True
        ),
        (3, 5, 16),
        ("self_attn", "linear1", "linear2", "norm1", "norm2"),
    ),
    Case("gru_linear", RecurrentHead, (3, 7, 6), ("fc",)),
    Case(
        "conv1d",
        lambda: nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Conv1d(8, 8, 3, stride=2)),
        (3, 4, 15),
        ("0", "2"),
    ),
    Case(
        "layer_norm",
        lambda: nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Tanh(), nn.LayerNorm(8)),
        (2, 5, 8),
        ("0", "1", "3"),
    ),
    Case(
        "batch_norm1d_2d_input",
        lambda: nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU()),
        (5, 8),
        ("0", "1"),
    ),
    Case(
        "batch_norm1d_3d_input",
        lambda: nn.Sequential(nn.Conv1d(4, 6, 1), nn.BatchNorm1d(6)),
        (3, 4, 7),
        ("0", "1"),
    ),
    Case("multihead_attention", SelfAttention, (2, 5, 8), ("attn", "proj")),
]


def _build(case: Case) -> nn.Module:
    torch.manual_seed(0)
    model = case.build()
    with torch.no_grad():  # non-default norm affine parameters and running statistics
        for module in model.modules():
            if isinstance(module, nn.LayerNorm | nn.BatchNorm1d | nn.BatchNorm2d):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.3)
                module.running_var.uniform_(0.5, 1.5)
    return model


def _base_name(wrapped_name: str) -> str:
    """``layer.base.weight`` in the wrapped model is ``layer.weight`` in the original."""
    return re.sub(r"(^|\.)base\.", r"\1", wrapped_name)


def _outputs(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(1234)  # same dropout masks for both models
    outputs = _outputs(model(x))
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outputs)
    loss.backward()  # type: ignore[union-attr]
    return tuple(o.detach() for o in outputs)


def _assert_same_state(original: nn.Module, wrapped: esper.MorphableModel) -> None:
    reference_params = dict(original.named_parameters())
    wrapped_params = {_base_name(n): p for n, p in wrapped.model.named_parameters()}
    assert wrapped_params.keys() == reference_params.keys()
    for name, param in reference_params.items():
        assert param.grad is not None, name
        assert torch.equal(wrapped_params[name].grad, param.grad), name  # type: ignore[arg-type]
    reference_buffers = dict(original.named_buffers())
    wrapped_buffers = {_base_name(n): b for n, b in wrapped.model.named_buffers()}
    for name, buffer in reference_buffers.items():
        assert torch.equal(wrapped_buffers[name], buffer), name


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_dormant_wrapped_model_is_bit_identical(case: Case, mode: str) -> None:
    original = _build(case)
    wrapped = esper.wrap(copy.deepcopy(original), seeds_per_layer=2)
    original.train(mode == "train")
    wrapped.train(mode == "train")
    x = torch.randn(case.input_shape)

    for _ in range(2):  # twice: BatchNorm statistics and accumulated gradients still agree
        expected = _run(original, x)
        actual = _run(wrapped, x)
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert torch.equal(a, e)
        _assert_same_state(original, wrapped)

    assert tuple(wrapped.layer_names) == case.wrapped_layers


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_dormant_wrapped_model_is_bit_identical_in_inference(case: Case) -> None:
    # eval + no_grad: TransformerEncoderLayer and MultiheadAttention take PyTorch's fused paths.
    original = _build(case).eval()
    wrapped = esper.wrap(copy.deepcopy(original), seeds_per_layer=2).eval()
    x = torch.randn(case.input_shape)

    with torch.no_grad():
        expected = _outputs(original(x))
        actual = _outputs(wrapped(x))

    for a, e in zip(actual, expected, strict=True):
        assert torch.equal(a, e)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_inplace_wrap_keeps_the_very_same_base_modules(case: Case) -> None:
    model = _build(case)
    reference = copy.deepcopy(model)
    modules = dict(model.named_modules())
    parameters = dict(model.named_parameters())

    wrapped = esper.wrap(model, seeds_per_layer=2, inplace=True)

    assert wrapped.model is model
    for name in case.wrapped_layers:
        layer = wrapped.layer(name)
        assert isinstance(layer, KasminaLayer)
        assert layer.base is modules[name]
        assert dict(model.named_modules())[name] is layer
    for name, param in wrapped.model.named_parameters():
        assert param is parameters[_base_name(name)], name
    x = torch.randn(case.input_shape)
    expected = _run(reference, x)
    for a, e in zip(_run(wrapped, x), expected, strict=True):
        assert torch.equal(a, e)
    _assert_same_state(reference, wrapped)


def test_transformer_fused_path_is_taken_by_both_models(monkeypatch: pytest.MonkeyPatch) -> None:
    fused = torch._transformer_encoder_layer_fwd
    calls: list[int] = []

    def counting_fused(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counting_fused)
    original = _build(CASES[2]).eval()
    wrapped = esper.wrap(copy.deepcopy(original)).eval()
    x = torch.randn(3, 5, 16)

    with torch.no_grad():
        expected = original(x)
        assert len(calls) == 1
        actual = wrapped(x)

    assert len(calls) == 2  # a dormant wrapped layer keeps PyTorch's fast path
    assert torch.equal(actual, expected)
