"""Hugging Face models as hosts: tiny GPT-2 and Llama built from configs (nothing downloaded).

Seeds on GPT-2's ``Conv1D`` projections, ``LlamaRMSNorm`` and the token embeddings: the wrapped
model is bit-exact while dormant (train and eval, logits and gradients), a kernel grafted on each
kind computes the hand-written formula, the model trains, its ``state_dict`` reloads into a fresh
wrap, and ``unwrap()`` gives back transformers' own modules (a linear kernel merged into a
Conv1D's ``(in, out)`` weight). Skipped when the ``hf`` extra is not installed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import esper
from esper.contracts import BlueprintSpec
from esper.core.unwrap import FROZEN_KERNELS
from esper.execution import InMemoryArtifactSource

transformers = pytest.importorskip("transformers")
Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

Germinate = Callable[..., nn.Module]
LINEAR_RANK2 = BlueprintSpec(
    family="lowrank_adapter", params={"rank": 2, "activation": "identity", "bias": True}
)
VOCAB = 50


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=16, bos_token_id=0,
        eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # non-trivial norm gains
        for module in model.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.weight.normal_(1.0, 0.2)
    return model


HOSTS = {
    "gpt2": (_gpt2, ["kind:hf_conv1d", "kind:embedding"]),
    "llama": (_llama, ["kind:rms_norm", "kind:embedding", "kind:linear"]),
}


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(1234)  # the same dropout masks for both models
    return model(input_ids=ids).logits  # (B, T, V)


def _loss(logits: torch.Tensor) -> torch.Tensor:
    return (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("host", sorted(HOSTS))
def test_a_dormant_hf_model_is_bit_exact(host: str, mode: str) -> None:
    build, targets = HOSTS[host]
    original = build()
    wrapped = esper.wrap(copy.deepcopy(original), target_layers=targets, seeds_per_layer=2)
    kinds = {wrapped.layer(name).profile.kind for name in wrapped.layer_names}
    assert kinds >= {"embedding", "hf_conv1d" if host == "gpt2" else "rms_norm"}
    original.train(mode == "train")
    wrapped.train(mode == "train")

    expected, actual = _logits(original, _ids()), _logits(wrapped, _ids())
    _loss(expected).backward()
    _loss(actual).backward()

    assert torch.equal(actual, expected)
    grads = {n.replace("base.", ""): p.grad for n, p in wrapped.model.named_parameters()}
    for name, parameter in original.named_parameters():
        assert torch.equal(grads[name], parameter.grad), name  # type: ignore[arg-type]


def test_a_kernel_on_gpt2_conv1d_reads_its_input_and_adds_to_its_output(
    source: InMemoryArtifactSource, germinate: Germinate
) -> None:
    model = esper.wrap(_gpt2(), target_layers="kind:hf_conv1d", kernel_source=source)
    name = "transformer.h.0.attn.c_attn"
    layer = model.layer(name)
    assert (layer.profile.in_features, layer.profile.out_features) == (32, 96)
    kernel = germinate(model, name, 0, LINEAR_RANK2)
    model.set_seed_alpha(name, seed_idx=0, alpha=0.6)
    x = torch.randn(2, 7, 32)

    base = x @ layer.base.weight + layer.base.bias  # Conv1D: weight is (in, out)
    k = F.linear(
        F.linear(x, kernel.down.weight, kernel.down.bias), kernel.up.weight, kernel.up.bias
    )

    assert torch.allclose(layer(x), base + 0.6 * k, atol=1e-6)


def _grow_and_train(host: str, source: InMemoryArtifactSource, germinate: Germinate) -> nn.Module:
    build, targets = HOSTS[host]
    model = esper.wrap(build(), target_layers=targets, kernel_source=source, blend_steps=2)
    grown = (
        ["transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_proj", "transformer.wte"]
        if host == "gpt2"
        else ["model.layers.0.input_layernorm", "model.norm", "model.embed_tokens"]
    )
    for name in grown:
        germinate(model, name, 0, LINEAR_RANK2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.attach_optimizer(optimizer)
    kernel_before = [p.detach().clone() for p in model.kernel_parameters()]
    ids = _ids()
    losses = []
    for _ in range(4):
        logits = model(input_ids=ids).logits  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    after = list(model.kernel_parameters())
    assert len(after) == len(kernel_before) == 4 * len(grown)
    assert all(not torch.equal(a, b) for a, b in zip(after, kernel_before, strict=True))
    return model


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_a_grown_hf_model_trains_and_reloads_into_a_fresh_wrap(
    host: str, source: InMemoryArtifactSource, germinate: Germinate
) -> None:
    model = _grow_and_train(host, source, germinate)
    build, targets = HOSTS[host]
    fresh = esper.wrap(build(), target_layers=targets, kernel_source=source)
    model.eval()
    fresh.eval()

    fresh.load_state_dict(model.state_dict())

    ids = _ids()
    assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_unwrap_gives_back_transformers_modules(
    host: str, source: InMemoryArtifactSource, germinate: Germinate
) -> None:
    model = _grow_and_train(host, source, germinate).eval()
    ids = _ids()

    plain = esper.unwrap(model).eval()

    assert not any(type(m).__module__.startswith("esper") for m in plain.modules())
    assert torch.allclose(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
    if host == "gpt2":
        c_fc = plain.transformer.h[0].mlp.c_fc
        assert type(c_fc) is Conv1D and FROZEN_KERNELS not in c_fc._modules  # merged
        assert c_fc.weight.shape == (32, 128)
        assert FROZEN_KERNELS in plain.transformer.wte._modules  # tied to lm_head: kept beside
        assert plain.lm_head.weight is plain.transformer.wte.weight
    else:
        norm = plain.model.norm
        assert type(norm).__name__ == "LlamaRMSNorm" and FROZEN_KERNELS in norm._modules
        assert type(plain.model.embed_tokens) is nn.Embedding
        assert FROZEN_KERNELS not in plain.model.embed_tokens._modules  # untied: merged
