"""Shipped policy: how the packaged GNN policy compares with the baselines on held-out episodes.

Run: ``python benchmarks/shipped_policy.py`` (about 5 minutes on 2 CPU cores). On the synthetic
teacher-student task whose bottleneck layer is drawn per episode, every policy grafts one
``mlp_h32`` kernel (the same parameter budget); it prints each policy's hit rate (germinations at
the true bottleneck) and mean final validation loss over the same 24 held-out episodes, plus the
no-growth loss, and the shipped policy's hit rate over 100 held-out episodes (its record's figure).
"""

from __future__ import annotations

import torch

from esper.tamiyo.baselines import RandomPolicy, RoundRobinPolicy
from esper.tamiyo.learning.episodes import EpisodeConfig
from esper.tamiyo.learning.growth_tasks import BottleneckTask
from esper.tamiyo.learning.policy_training import (
    HELD_OUT_SEEDS,
    PRETRAINED_DIR,
    PRETRAINED_NAME,
    evaluate_policy,
)
from esper.tamiyo.policy import load_gnn_policy


def main() -> None:
    torch.set_num_threads(1)
    task = BottleneckTask()
    shipped = load_gnn_policy(PRETRAINED_DIR / f"{PRETRAINED_NAME}.safetensors")
    quick = evaluate_policy(
        task, shipped, list(HELD_OUT_SEEDS[:100]), episode=EpisodeConfig(steps_after=0)
    )
    print(f"shipped GNN, 100 held-out episodes: hit rate {quick.hit_rate:.2f}")
    seeds = list(HELD_OUT_SEEDS[:24])
    policies = {"GNN": shipped, "random": RandomPolicy(seed=0), "round-robin": RoundRobinPolicy()}
    for name, policy in policies.items():
        summary = evaluate_policy(task, policy, seeds)
        print(
            f"{name:12s} hit rate {summary.hit_rate:.2f}  final val loss {summary.mean_val_loss:.3f}"
        )
    none = evaluate_policy(task, policies["GNN"], seeds, episode=EpisodeConfig(max_germinations=0))
    print(f"{'no growth':12s} final val loss {none.mean_val_loss:.3f}")


if __name__ == "__main__":
    main()
