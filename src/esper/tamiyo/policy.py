"""GNN growth policy: attention over the layer graph -> where to grow, how valuable, how sure.

Architecture (torch_geometric)::

    node features (symlog) ++ per-graph standardized health ─► Linear ─┐
    global features ─► Linear ─────────────── broadcast to nodes ─────┴► h  (N, H)
    L × [ GATv2Conv (multi-head, data-flow and reversed edges, edge type as edge feature)
          + residual + LayerNorm ]                                       h  (N, H)
    actor:  per node, E ensemble heads × C catalog options ─► logits     (N, E, C)
    wait:   pooled (mean ++ max ++ globals) ─► E logits                  (B, E)
    value:  pooled ─► E values                                           (B, E)

The acting distribution is the mixture of the E heads' softmaxes (each over the flat action space,
invalid actions at ``-inf`` so they get probability exactly zero). The heads start from different
weights and are trained through the mixture, so where training data was seen they agree and
elsewhere they disagree: the spread of the probability they give the chosen action is the
policy's uncertainty. There is no dropout, so every pass is deterministic; ``act(explore=False)``
takes the most probable allowed action.

Saved as one safetensors blob (weights) whose header carries the JSON config; nothing is
pickled. :meth:`GNNPolicy.to_bytes` / :meth:`GNNPolicy.from_bytes` for blobs (e.g. in Urza),
:meth:`GNNPolicy.save` / :func:`load_gnn_policy` for files.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from torch_geometric.data import Batch, Data
from torch_geometric.nn import GATv2Conv, global_max_pool, global_mean_pool
from torch_geometric.utils import to_dense_batch

from esper.contracts.config_model import ConfigModel
from esper.errors import ConfigurationError
from esper.tamiyo.graph import HEALTH_FEATURES
from esper.tamiyo.observation import (
    BLUEPRINT_CATALOG,
    GLOBAL_FEATURES,
    NODE_FEATURES,
    ActionEvaluation,
    GrowthAction,
    LayerGraph,
    PolicyOutput,
)

FORMAT = "esper.gnn_policy"
"""Key of the policy config in the safetensors header."""

FORMAT_VERSION = 1

_HEALTH_COLUMNS = [NODE_FEATURES.index(name) for name in HEALTH_FEATURES]
_NUM_OPTIONS = len(BLUEPRINT_CATALOG)


class GNNPolicyConfig(ConfigModel):
    """Hyperparameters of :class:`GNNPolicy`.

    Attributes:
        hidden: width of node embeddings.
        attention_heads: attention heads per GATv2 layer (``hidden`` must be divisible by it).
        layers: message-passing layers.
        ensemble: actor and value heads whose spread measures uncertainty (1: no estimate).
        relative_health: also feed each health column standardized over the graph's nodes, so
            the policy can compare layers of one model directly.
        init_seed: seed of the weight initialisation.

    Raises:
        ConfigurationError: a field out of range, or ``hidden`` not a multiple of the heads.
    """

    hidden: int = Field(default=64, ge=1)
    attention_heads: int = Field(default=4, ge=1)
    layers: int = Field(default=3, ge=1)
    ensemble: int = Field(default=5, ge=1)
    relative_health: bool = True
    init_seed: int = 0

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> GNNPolicyConfig:
        if self.hidden % self.attention_heads:
            raise ValueError(
                f"GNN policy hidden={self.hidden} must be a positive multiple of "
                f"attention_heads={self.attention_heads}"
            )
        return self

    @property
    def input_features(self) -> int:
        """Width of the encoded node features."""
        return len(NODE_FEATURES) + (len(HEALTH_FEATURES) if self.relative_health else 0)


def _symlog(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


def encode_graph(graph: LayerGraph, *, relative_health: bool = True) -> Data:
    """The torch_geometric form of an observation.

    Edges are the data-flow edges plus their reverses; ``edge_attr`` one-hot encodes the
    direction (forward, backward), so information flows both ways but stays distinguishable.

    Returns:
        ``Data`` with ``x (N, F)``, ``edge_index (2, 2E)``, ``edge_attr (2E, 2)``,
        ``mask (N, C)`` bool, ``globals (1, G)``.
    """
    x = _symlog(graph.node_features)  # (N, F)
    if relative_health:
        health = graph.node_features[:, _HEALTH_COLUMNS]  # (N, 6)
        if graph.num_nodes > 1:
            centered = health - health.mean(dim=0, keepdim=True)
            relative = centered / (health.std(dim=0, keepdim=True) + 1e-3)
        else:
            relative = torch.zeros_like(health)
        x = torch.cat([x, relative], dim=1)  # (N, F + 6)
    forward = graph.edge_index
    edge_index = torch.cat([forward, forward.flip(0)], dim=1)  # (2, 2E)
    num_edges = forward.shape[1]
    edge_attr = torch.zeros((2 * num_edges, 2))
    edge_attr[:num_edges, 0] = 1.0
    edge_attr[num_edges:, 1] = 1.0
    return Data(
        x=x,
        edge_index=edge_index,
        edge_attr=edge_attr,
        mask=graph.germinate_mask,
        globals=_symlog(graph.global_features).reshape(1, -1),  # (1, G)
        num_nodes=graph.num_nodes,
    )


class GNNPolicy(nn.Module):
    """Attention GNN over the layer graph; implements :class:`~esper.tamiyo.GrowthPolicy`.

    Args:
        config: hyperparameters (defaults: 3 GATv2 layers of width 64, 4 heads, ensemble of 5).
        sample_seed: seed of the generator used when ``act(explore=True)`` samples.
    """

    def __init__(self, config: GNNPolicyConfig | None = None, *, sample_seed: int = 0) -> None:
        super().__init__()
        self.config = config = config or GNNPolicyConfig()
        hidden, ensemble = config.hidden, config.ensemble
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            self.node_in = nn.Linear(config.input_features, hidden)
            self.global_in = nn.Linear(len(GLOBAL_FEATURES), hidden)
            self.convs = nn.ModuleList(
                GATv2Conv(
                    hidden,
                    hidden // config.attention_heads,
                    heads=config.attention_heads,
                    edge_dim=2,
                    add_self_loops=True,
                    fill_value=0.0,
                )
                for _ in range(config.layers)
            )
            self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(config.layers))
            self.actor = nn.Sequential(
                nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, ensemble * _NUM_OPTIONS)
            )
            self.wait = nn.Sequential(
                nn.Linear(3 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, ensemble)
            )
            self.value = nn.Sequential(
                nn.Linear(3 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, ensemble)
            )
        self._generator = torch.Generator().manual_seed(sample_seed)
        self.eval()  # no dropout or batch norm: train/eval modes compute the same thing

    @property
    def name(self) -> str:
        """``"gnn"``."""
        return "gnn"

    # -- forward -------------------------------------------------------------------------------

    def encode(self, graph: LayerGraph) -> Data:
        """:func:`encode_graph` with this policy's settings."""
        return encode_graph(graph, relative_health=self.config.relative_health)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head masked logits over the flat action space and per-head values.

        Args:
            batch: ``Batch`` of :meth:`encode` outputs (B graphs, at most ``N_max`` nodes).

        Returns:
            ``logits (B, E, 1 + N_max * C)`` with ``-inf`` at invalid and padding actions, and
            ``values (B, E)``.
        """
        node_batch = batch.batch  # (N_total,)
        g = self.global_in(batch.globals)  # (B, H)
        h = self.node_in(batch.x) + g[node_batch]  # (N_total, H)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            h = norm(h + torch.relu(conv(h, batch.edge_index, batch.edge_attr)))
        pooled = torch.cat(
            [global_mean_pool(h, node_batch), global_max_pool(h, node_batch), g], dim=1
        )  # (B, 3H)
        ensemble = self.config.ensemble
        node_logits = self.actor(h).reshape(-1, ensemble, _NUM_OPTIONS)  # (N_total, E, C)
        dense, present = to_dense_batch(node_logits, node_batch)  # (B, N_max, E, C), (B, N_max)
        mask, _ = to_dense_batch(batch.mask, node_batch)  # (B, N_max, C)
        allowed = (mask & present.unsqueeze(-1)).unsqueeze(2)  # (B, N_max, 1, C)
        dense = dense.masked_fill(~allowed, -math.inf)
        b, n_max = dense.shape[:2]
        flat = dense.permute(0, 2, 1, 3).reshape(b, ensemble, n_max * _NUM_OPTIONS)  # (B, E, N*C)
        wait = self.wait(pooled).unsqueeze(-1)  # (B, E, 1)
        return torch.cat([wait, flat], dim=-1), self.value(pooled)

    @staticmethod
    def mixture(logits: torch.Tensor) -> torch.Tensor:
        """``(B, A)`` mixture probabilities from ``(B, E, A)`` per-head logits."""
        return torch.softmax(logits, dim=-1).mean(dim=1)

    def evaluate_actions(
        self, graphs: Sequence[LayerGraph | Data], actions: torch.Tensor
    ) -> ActionEvaluation:
        """Log-probabilities, entropies and values for a batch, with gradients (for trainers).

        Args:
            graphs: observations (or their :meth:`encode` outputs).
            actions: ``(B,)`` int64 flat action indices.
        """
        batch = self.collate(graphs)
        logits, values = self(batch)
        probs = self.mixture(logits)  # (B, A)
        chosen = probs.gather(1, actions.reshape(-1, 1)).squeeze(1)  # (B,)
        log_probs = torch.log(probs.clamp_min(1e-30))
        entropy = -(probs * log_probs).sum(dim=1)  # (B,); zero-probability terms add 0
        return ActionEvaluation(torch.log(chosen.clamp_min(1e-30)), entropy, values)

    def collate(self, graphs: Sequence[LayerGraph | Data]) -> Batch:
        """Encode (where needed) and batch observations."""
        data = [g if isinstance(g, Data) else self.encode(g) for g in graphs]
        return Batch.from_data_list(data)

    # -- acting --------------------------------------------------------------------------------

    @torch.no_grad()
    def act(self, graph: LayerGraph, *, explore: bool = False) -> PolicyOutput:
        """Choose an allowed action: sample from the mixture if ``explore``, else its argmax.

        ``uncertainty`` is the standard deviation across ensemble heads of the probability each
        gives the chosen action (0 with one head).
        """
        logits, values = self(self.collate([graph]))
        per_head = torch.softmax(logits[0], dim=-1)  # (E, A)
        probs = per_head.mean(dim=0)  # (A,)
        if explore:
            index = int(torch.multinomial(probs, 1, generator=self._generator))
        else:
            index = int(torch.argmax(probs))
        p = float(probs[index])
        spread = float(per_head[:, index].std(unbiased=False)) if len(per_head) > 1 else 0.0
        return PolicyOutput(
            action=GrowthAction.from_index(index),
            log_prob=math.log(max(p, 1e-30)),
            value=float(values[0].mean()),
            confidence=min(1.0, max(0.0, p)),
            uncertainty=spread,
        )

    # -- persistence ---------------------------------------------------------------------------

    def to_bytes(self, *, extra: dict[str, Any] | None = None) -> bytes:
        """The policy as safetensors bytes; the header holds the config (and ``extra`` JSON)."""
        header = {
            "format_version": FORMAT_VERSION,
            "config": self.config.model_dump(),
            "node_features": list(NODE_FEATURES),
            "global_features": list(GLOBAL_FEATURES),
            "catalog": [option.name for option in BLUEPRINT_CATALOG],
            "extra": extra or {},
        }
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        return save_safetensors(tensors, metadata={FORMAT: json.dumps(header, sort_keys=True)})

    def save(self, path: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
        """Write :meth:`to_bytes` to ``path``; returns the path."""
        path = Path(path)
        path.write_bytes(self.to_bytes(extra=extra))
        return path

    @classmethod
    def from_bytes(cls, data: bytes, *, sample_seed: int = 0) -> GNNPolicy:
        """Rebuild a policy from :meth:`to_bytes` output (no code from the blob is executed).

        Raises:
            ConfigurationError: the bytes are not an Esper GNN policy, or it was trained for other
                node/global features or another blueprint catalog.
        """
        header = read_policy_header(data)
        expected = {
            "node_features": list(NODE_FEATURES),
            "global_features": list(GLOBAL_FEATURES),
            "catalog": [option.name for option in BLUEPRINT_CATALOG],
        }
        for key, value in expected.items():
            if header.get(key) != value:
                raise ConfigurationError(
                    f"policy was trained with {key}={header.get(key)}, but this Esper uses "
                    f"{value}; retrain the policy for this version"
                )
        policy = cls(GNNPolicyConfig.model_validate(header.get("config")), sample_seed=sample_seed)
        try:
            policy.load_state_dict(load_safetensors(data), strict=True)
        except (RuntimeError, ValueError) as exc:
            raise ConfigurationError(f"policy weights do not match its config: {exc}") from exc
        return policy


def read_policy_header(data: bytes) -> dict[str, Any]:
    """The JSON header of a saved policy (config, feature names, catalog, ``extra``).

    Raises:
        ConfigurationError: ``data`` is not a safetensors file carrying an Esper GNN policy.
    """
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        raw = header["__metadata__"][FORMAT]
        parsed: dict[str, Any] = json.loads(raw)
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(
            f"not an Esper GNN policy ({len(data)} bytes): expected a safetensors file whose "
            f"header has {FORMAT!r} metadata, as written by GNNPolicy.save ({exc})"
        ) from None
    if parsed.get("format_version") != FORMAT_VERSION:
        raise ConfigurationError(
            f"GNN policy format version {parsed.get('format_version')} is not supported "
            f"(expected {FORMAT_VERSION})"
        )
    return parsed


def load_gnn_policy(source: str | Path | bytes, *, sample_seed: int = 0) -> GNNPolicy:
    """A saved policy from a file path or from its bytes.

    Raises:
        ConfigurationError: the file is missing or not a compatible Esper GNN policy.
    """
    if isinstance(source, bytes):
        return GNNPolicy.from_bytes(source, sample_seed=sample_seed)
    path = Path(source)
    if not path.is_file():
        raise ConfigurationError(
            f"no policy file at {str(path)!r}; pass the path of a file written by GNNPolicy.save"
        )
    return GNNPolicy.from_bytes(path.read_bytes(), sample_seed=sample_seed)
