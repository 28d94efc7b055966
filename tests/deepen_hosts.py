"""Hosts for the DEEPEN tests: a small plain-PyTorch GPT (token embedding, N pre-LN blocks of
causal attention + MLP, head), MLPs with and without a container, and small CNNs."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.act = nn.GELU()
        self.c_proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[1]  # x: (B, T, C)
        mask = torch.triu(torch.ones(tokens, tokens, dtype=torch.bool, device=x.device), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.c_proj(self.act(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Embedding -> ``depth`` blocks -> LayerNorm -> vocabulary head."""

    def __init__(self, vocab: int = 17, d_model: int = 16, heads: int = 2, depth: int = 2,
                 context: int = 8) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(torch.randn(context, d_model) * 0.1)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.position[: idx.shape[1]]  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))  # (B, T, vocab)


class AttributeMLP(nn.Module):
    """An MLP whose layers are plain attributes (no container to insert into)."""

    def __init__(self, features: int = 6, width: int = 12, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, width)
        self.act = nn.ReLU()
        self.out = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.fc1(x)))


def sequential_mlp(features: int = 6, width: int = 12, classes: int = 3) -> nn.Sequential:
    """``Linear -> ReLU -> Linear -> ReLU -> Linear`` with numeric keys."""
    return nn.Sequential(
        nn.Linear(features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, classes),
    )  # fmt: skip


def conv_net(dims: int = 1, channels: int = 4, classes: int = 3) -> nn.Sequential:
    """Conv -> ReLU -> Conv -> ReLU -> global pool -> Linear, for (B, 2, L) or (B, 2, H, W)."""
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
    return nn.Sequential(
        conv(2, channels, 3, padding=1), nn.ReLU(), conv(channels, channels, 3, padding=1),
        nn.ReLU(), pool, nn.Flatten(), nn.Linear(channels, classes),
    )  # fmt: skip


class DecoderLayer(nn.Module):
    """An HF Llama-style decoder layer: RMSNorm, attention ending in ``o_proj``, a gated MLP
    ending in ``down_proj``; called with keywords, returns a tuple."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(d_model)
        self.heads = heads
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.post_attention_layernorm = nn.RMSNorm(d_model)
        self.gate_proj = nn.Linear(d_model, 2 * d_model, bias=False)
        self.up_proj = nn.Linear(d_model, 2 * d_model, bias=False)
        self.down_proj = nn.Linear(2 * d_model, d_model, bias=False)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor]:
        b, t, c = hidden_states.shape  # (B, T, C)
        q, k, v = self.qkv_proj(self.input_layernorm(hidden_states)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        h = hidden_states + self.o_proj(att.transpose(1, 2).reshape(b, t, c))  # (B, T, C)
        m = self.post_attention_layernorm(h)
        h = h + self.down_proj(nn.functional.silu(self.gate_proj(m)) * self.up_proj(m))
        return (h,)


class LlamaStyle(nn.Module):
    """``embed_tokens -> model.layers (keyword calls, tuple outputs) -> norm -> lm_head``."""

    def __init__(self, vocab: int = 17, d_model: int = 16, heads: int = 2, depth: int = 2) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, d_model)
        self.model.layers = nn.ModuleList(DecoderLayer(d_model, heads) for _ in range(depth))
        self.model.norm = nn.RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids)  # (B, T, C)
        t = input_ids.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
        for layer in self.model.layers:
            h = layer(hidden_states=h, attention_mask=mask)[0]
        return self.lm_head(self.model.norm(h))  # (B, T, vocab)
