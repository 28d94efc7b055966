"""Stock layers as hosts without transformers: ``nn.Embedding``, ``nn.RMSNorm`` and an HF-style
RMSNorm class (``LlamaRMSNorm``'s code, recognised by name and shape). Dormant seeds are
bit-exact, grafted kernels compute the hand-written formula, and kept linear kernels merge into an
embedding table exactly where that is exact (not with ``max_norm``, not into a tied table)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import esper
from esper.blueprints import check_compatible, is_compatible
from esper.contracts import BlueprintSpec
from esper.core.unwrap import FROZEN_KERNELS
from esper.errors import BlueprintError
from esper.execution import KasminaLayer

Germinate = Callable[..., nn.Module]
LINEAR_RANK2 = BlueprintSpec(
    family="lowrank_adapter", params={"rank": 2, "activation": "identity", "bias": True}
)


class LlamaStyleRMSNorm(nn.Module):
    """``LlamaRMSNorm`` as transformers writes it (float32 statistics, ``variance_epsilon``)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class TiedLM(nn.Module):
    """Embedding, norm, and an output head that shares the embedding table (as GPT-2's)."""

    def __init__(self, vocab: int = 20, width: int = 8, max_norm: float | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0, max_norm=max_norm)
        self.norm = nn.RMSNorm(width)
        self.mix = nn.Linear(width, width)
        self.final_norm = LlamaStyleRMSNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)  # (B, T, C)
        h = h + self.mix(self.norm(h))
        return self.head(self.final_norm(h))  # (B, T, V)


def _host(**options: object) -> TiedLM:
    torch.manual_seed(0)
    model = TiedLM(**options)  # type: ignore[arg-type]
    with torch.no_grad():
        model.norm.weight.normal_(1.0, 0.2)
        model.final_norm.weight.normal_(1.0, 0.2)
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(1))


def _loss(out: torch.Tensor) -> torch.Tensor:
    return (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_dormant_embedding_and_rms_norms_are_bit_exact_forward_and_backward(mode: str) -> None:
    original = _host()
    wrapped = esper.wrap(copy.deepcopy(original), target_layers=["kind:embedding", "kind:rms_norm"])
    assert wrapped.layer_names == ["embed", "norm", "final_norm"]
    assert [wrapped.layer(n).profile.kind for n in wrapped.layer_names] == [
        "embedding",
        "rms_norm",
        "rms_norm",
    ]
    original.train(mode == "train")
    wrapped.train(mode == "train")

    expected, actual = original(_ids()), wrapped(_ids())
    _loss(expected).backward()
    _loss(actual).backward()

    assert torch.equal(actual, expected)
    grads = {n.replace("base.", ""): p.grad for n, p in wrapped.model.named_parameters()}
    for name, parameter in original.named_parameters():
        assert torch.equal(grads[name], parameter.grad), name  # type: ignore[arg-type]


def test_an_embedding_kernel_reads_the_looked_up_vectors(
    source: object, germinate: Germinate
) -> None:
    host = _host()
    model = esper.wrap(copy.deepcopy(host), target_layers="kind:embedding", kernel_source=source)  # type: ignore[arg-type]
    kernel = germinate(model, "embed", 0, LINEAR_RANK2)
    model.set_seed_alpha("embed", seed_idx=0, alpha=0.7)
    ids = _ids()

    e = F.embedding(ids, host.embed.weight, padding_idx=0)  # (B, T, C)
    k = F.linear(
        F.linear(e, kernel.down.weight, kernel.down.bias), kernel.up.weight, kernel.up.bias
    )
    h = e + 0.7 * k
    h = h + host.mix(host.norm(h))
    expected = host.head(host.final_norm(h))

    assert torch.allclose(model(ids), expected, atol=1e-6)


@pytest.mark.parametrize("layer", ["norm", "final_norm"])
def test_an_rms_norm_kernel_reads_the_norm_input(
    source: object, germinate: Germinate, layer: str
) -> None:
    norm = _host().get_submodule(layer)
    model = esper.wrap(nn.Sequential(copy.deepcopy(norm)), kernel_source=source)  # type: ignore[arg-type]
    kernel = germinate(model, "0", 0, LINEAR_RANK2)
    model.set_seed_alpha("0", seed_idx=0, alpha=0.4)
    x = torch.randn(3, 5, 8)

    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    k = F.linear(
        F.linear(x, kernel.down.weight, kernel.down.bias), kernel.up.weight, kernel.up.bias
    )
    expected = norm.weight * rms + 0.4 * k  # type: ignore[operator]

    assert torch.allclose(model(x), expected, atol=1e-5)


def test_a_kept_linear_kernel_merges_exactly_into_an_untied_embedding_table(
    source: object, germinate: Germinate
) -> None:
    host = _host()
    host.head.weight = nn.Parameter(host.head.weight.detach().clone())  # untie
    model = esper.wrap(host, target_layers="kind:embedding", kernel_source=source)  # type: ignore[arg-type]
    germinate(model, "embed", 0, LINEAR_RANK2)
    germinate(model, "embed", 1, LINEAR_RANK2)
    model.set_seed_alpha("embed", seed_idx=0, alpha=1.0)
    model.set_seed_alpha("embed", seed_idx=1, alpha=0.3)
    ids = _ids()

    plain = esper.unwrap(model)

    assert type(plain.embed) is nn.Embedding and FROZEN_KERNELS not in plain.embed._modules
    assert plain.embed.weight.shape == (20, 8)
    assert torch.allclose(plain(ids), model(ids), atol=1e-5)
    assert not torch.allclose(plain(ids), host(ids), atol=1e-3)


@pytest.mark.parametrize("case", ["tied", "max_norm"])
def test_an_embedding_is_not_merged_where_merging_would_not_be_exact(
    source: object, germinate: Germinate, case: str
) -> None:
    host = _host(max_norm=1.0) if case == "max_norm" else _host()
    if case == "tied":
        host.head.weight = host.embed.weight  # (V, C) both ways: GPT-2 ties them so
    model = esper.wrap(host, target_layers="kind:embedding", kernel_source=source)  # type: ignore[arg-type]
    germinate(model, "embed", 0, LINEAR_RANK2)
    model.set_seed_alpha("embed", seed_idx=0, alpha=1.0)
    ids = _ids()
    expected = model(ids)

    plain = esper.unwrap(model)

    assert FROZEN_KERNELS in plain.embed._modules  # kept beside the table instead
    assert not any(isinstance(m, KasminaLayer) for m in plain.modules())
    assert torch.allclose(plain(ids), expected, atol=1e-6)
    if case == "tied":
        assert plain.head.weight is plain.embed.weight
        assert torch.equal(plain.head.weight, host.embed.weight)


@pytest.mark.parametrize(
    "module",
    [nn.Embedding(20, 8), nn.RMSNorm(8), LlamaStyleRMSNorm(8)],
    ids=lambda m: type(m).__name__,
)
def test_the_feature_families_serve_stock_kinds_and_conv_adapter_says_why_not(
    module: nn.Module,
) -> None:
    target = esper.KasminaLayer(module).target()

    for family, params in [("lowrank_adapter", {"rank": 4}), ("residual_mlp", {"hidden": 16})]:
        assert is_compatible(BlueprintSpec(family=family, params=params), target)
    with pytest.raises(BlueprintError, match="use lowrank_adapter or residual_mlp for features"):
        check_compatible(BlueprintSpec(family="conv_adapter"), target)
