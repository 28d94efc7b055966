"""PyTorch's inference fast paths around running kernels (issue 9, item 1).

``nn.TransformerEncoder`` (``enable_nested_tensor=True``) turns a padded batch into a nested tensor
in eval under ``torch.no_grad()`` when a ``src_key_padding_mask`` is given, and runs its layers on
it; ``nn.MultiheadAttention`` has a native fast path of its own and uses SDPA otherwise. In every
one of them a running kernel must contribute exactly what the documented formula says, and
nothing Esper does around a kernel may crash the host's forward.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

import esper
from esper.contracts import BlueprintSpec, SeedState
from esper.execution import InMemoryArtifactSource

Germinate = Callable[..., nn.Module]

LOWRANK = BlueprintSpec(family="lowrank_adapter", params={"rank": 2})
RESIDUAL = BlueprintSpec(family="residual_mlp", params={"hidden": 6, "norm": True})

PADDING = torch.tensor(
    [[False] * 6, [False] * 4 + [True] * 2, [False] * 2 + [True] * 4]
)  # (B=3, T=6): True marks padding, left-aligned sequences of lengths 6, 4, 2
REAL = PADDING.logical_not()


def _encoder() -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True
    )
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).eval()
    assert encoder.use_nested_tensor  # the precondition of the fast path under test
    return encoder


@pytest.fixture
def nested_conversions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the encoder's conversions of its input to a nested tensor (the real one runs)."""
    convert = torch._nested_tensor_from_mask
    calls: list[int] = []

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return convert(*args, **kwargs)

    monkeypatch.setattr(torch, "_nested_tensor_from_mask", counting)
    return calls


@contextmanager
def _hand_computation(
    plain: nn.Module, kernels: dict[str, nn.Module], alpha: float
) -> Iterator[None]:
    """Run ``plain`` densely and unfused, adding ``alpha * kernel(u)`` at each named layer by hand
    (``u``: the layer input, or the attention output for self-attention)."""

    def adder(name: str, kernel: nn.Module) -> Callable[..., object]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: object) -> object:
            if isinstance(output, tuple):
                return (output[0] + alpha * kernel(output[0]), *output[1:])
            assert isinstance(output, torch.Tensor)
            return output + alpha * kernel(args[0])

        return hook

    modules = dict(plain.named_modules())
    handles = [
        modules[name].register_forward_hook(adder(name, kernel)) for name, kernel in kernels.items()
    ]
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("spec", [LOWRANK, RESIDUAL], ids=["lowrank", "residual_mlp"])
@pytest.mark.parametrize(
    "layer_names",
    [
        ("layers.0.linear1",),
        ("layers.1.self_attn",),
        ("layers.0.norm1",),
        ("layers.0.linear2", "layers.1.self_attn", "layers.1.norm2"),
    ],
    ids=["linear", "attention", "layer_norm", "three_layers"],
)
def test_nested_tensor_inference_runs_the_kernels(
    source: InMemoryArtifactSource,
    germinate: Germinate,
    nested_conversions: list[int],
    layer_names: tuple[str, ...],
    spec: BlueprintSpec,
) -> None:
    plain = _encoder()
    model = esper.wrap(copy.deepcopy(plain), kernel_source=source).eval()
    kernels = {name: germinate(model, name, 0, spec) for name in layer_names}
    for name in layer_names:
        model.set_seed_alpha(name, seed_idx=0, alpha=0.8)
    x = torch.randn(3, 6, 16)

    with torch.no_grad():
        inference = model(x, src_key_padding_mask=PADDING)  # eval + no_grad: nested path
        baseline = plain(x, src_key_padding_mask=PADDING)
    conversions = len(nested_conversions)
    reference = model(x, src_key_padding_mask=PADDING).detach()  # grad enabled: dense, unfused
    with torch.no_grad(), _hand_computation(plain, kernels, 0.8):
        by_hand = plain(x, src_key_padding_mask=PADDING)

    assert conversions == 2  # both the wrapped and the plain encoder took the nested path
    assert torch.allclose(inference[REAL], reference[REAL], atol=1e-5)
    assert torch.allclose(inference[REAL], by_hand[REAL], atol=1e-5)
    assert torch.equal(inference[PADDING], torch.zeros_like(inference[PADDING]))  # as plain's
    assert not torch.allclose(inference[REAL], baseline[REAL], atol=1e-3)  # kernels contribute
    for name in layer_names:
        assert model.seed_state(name, 0) is SeedState.BLENDING  # no seed was faulted


def test_a_culled_kernel_gives_back_the_exact_nested_fast_path(
    source: InMemoryArtifactSource, germinate: Germinate
) -> None:
    plain = _encoder()
    model = esper.wrap(copy.deepcopy(plain), kernel_source=source).eval()
    germinate(model, "layers.0.linear1", 1)
    x = torch.randn(3, 6, 16)
    with torch.no_grad():
        model(x, src_key_padding_mask=PADDING)

    model.unload_kernel("layers.0.linear1", seed_idx=1)
    with torch.no_grad():
        culled = model(x, src_key_padding_mask=PADDING)
        expected = plain(x, src_key_padding_mask=PADDING)

    assert torch.equal(culled, expected)


def test_health_sampling_on_a_nested_forward_never_crashes_the_host(
    source: InMemoryArtifactSource, germinate: Germinate
) -> None:
    plain = _encoder()
    model = esper.wrap(copy.deepcopy(plain), kernel_source=source, health_every=1).eval()
    germinate(model, "layers.1.linear1", 0)
    model.set_seed_alpha("layers.1.linear1", seed_idx=0, alpha=1.0)
    x = torch.randn(3, 6, 16)

    model.step()  # arms health sampling on every layer, dormant ones included
    with torch.no_grad():
        inference = model(x, src_key_padding_mask=PADDING)
    signals = {s.layer_name: s for s in model.collect_telemetry()}

    assert torch.isfinite(inference).all()
    assert signals["layers.1.linear1"].samples == 1
    assert signals["layers.1.linear2"].samples == 1  # a dormant layer sampled a nested output
    seed = signals["layers.1.linear1"].seeds[0]
    assert not seed.nonfinite_output and seed.contribution_rms > 0
    assert model.seed_state("layers.1.linear1", 0) is SeedState.BLENDING


@pytest.fixture
def native_attention_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of MultiheadAttention's native fast path (the real one still runs)."""
    native = torch._native_multi_head_attention
    calls: list[int] = []

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return native(*args, **kwargs)

    monkeypatch.setattr(torch, "_native_multi_head_attention", counting)
    return calls


@pytest.mark.parametrize(
    ("mode", "grad", "need_weights", "native"),
    [
        ("eval", False, False, True),  # MultiheadAttention's native fast path
        ("eval", True, False, False),  # scaled_dot_product_attention
        ("train", True, True, False),  # explicit softmax with attention weights
    ],
    ids=["native_fast_path", "sdpa", "weights"],
)
def test_attention_paths_all_blend_the_kernel(
    source: InMemoryArtifactSource,
    germinate: Germinate,
    native_attention_calls: list[int],
    mode: str,
    grad: bool,
    need_weights: bool,
    native: bool,
) -> None:
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True, dropout=0.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=need_weights)[0]

    torch.manual_seed(0)
    plain = Attention().train(mode == "train")
    model = esper.wrap(copy.deepcopy(plain), kernel_source=source).train(mode == "train")
    kernel = germinate(model, "attn", 0, RESIDUAL)
    model.set_seed_alpha("attn", seed_idx=0, alpha=0.6)
    x = torch.randn(2, 5, 16)

    with torch.set_grad_enabled(grad):
        y = model(x)
    took_native_path = len(native_attention_calls) > 0
    with torch.no_grad():
        base = plain.attn(x, x, x, need_weights=True)[0]  # the reference path, not a fast one
        expected = base + 0.6 * kernel(base)

    assert took_native_path is native
    assert torch.allclose(y.detach(), expected, atol=1e-5)
