"""Policy loading: a growth policy chosen by name (a baseline) or by path (a trained GNN policy).

What ``growth.policy`` in a run's config and ``esper tamiyo serve --policy`` accept. The GNN
policy (and ``torch_geometric``) is imported only when a path is given.
"""

from __future__ import annotations

from pathlib import Path

from esper.errors import ConfigurationError
from esper.tamiyo.baselines import BASELINE_NAMES, make_baseline
from esper.tamiyo.observation import GrowthPolicy


def load_policy(spec: str, *, seed: int = 0) -> GrowthPolicy:
    """A policy by name (``random``, ``round_robin``, ``bottleneck``) or a trained policy's path.

    Raises:
        ConfigurationError: ``spec`` is neither a baseline name nor a loadable policy.
    """
    if spec in BASELINE_NAMES:
        return make_baseline(spec, seed=seed)
    if not Path(spec).is_file():
        raise ConfigurationError(
            f"unknown policy {spec!r}: use one of {', '.join(BASELINE_NAMES)}, or the path of a "
            "trained policy file (written by GNNPolicy.save)"
        )
    from esper.tamiyo.policy import load_gnn_policy  # imports torch_geometric

    return load_gnn_policy(spec, sample_seed=seed)
