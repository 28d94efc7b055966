"""Policy training recipe: teach the GNN policy where to grow with PPO (or A2C) on growth episodes.

The whole loop, readable top to bottom in :func:`train_policy`::

    policy = GNNPolicy(config.policy)
    for iteration in range(config.iterations):
        buffer = episodes of the task with the policy exploring (seeds never used for testing)
        stats = trainer.update(buffer)                # PPO or A2C
    held-out evaluation: :func:`evaluate_policy` on seeds from HELD_OUT_SEEDS

Regenerate the shipped policy (``esper/tamiyo/pretrained/bottleneck_gnn.safetensors``)::

    python -m esper.tamiyo.learning.policy_training --out src/esper/tamiyo/pretrained

It is deterministic on one machine: same config and seed, same weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from esper.contracts.config_model import ConfigModel
from esper.tamiyo.learning.a2c import A2CConfig, A2CStats, A2CTrainer
from esper.tamiyo.learning.episodes import EpisodeConfig, EpisodeResult, run_episode
from esper.tamiyo.learning.growth_tasks import BottleneckTask, GrowthTask
from esper.tamiyo.learning.ppo import PPOConfig, PPOStats, PPOTrainer
from esper.tamiyo.learning.rollout import RolloutBuffer
from esper.tamiyo.observation import GrowthPolicy
from esper.tamiyo.policy import GNNPolicy, GNNPolicyConfig
from esper.tamiyo.reward import ComponentCorrelation, RewardWeights, correlate_components

logger = logging.getLogger(__name__)

HELD_OUT_SEEDS = range(1_000_000, 1_000_000 + 10_000)
"""Episode seeds reserved for evaluation; training never draws from them."""

PRETRAINED_DIR = Path(__file__).parents[1] / "pretrained"
"""Where the shipped policy lives."""

BUDGETED_REWARD = RewardWeights(parameter_efficiency=0.02, compute_cost=0.01, memory_cost=0.01)
"""Reward weights for training episodes: the episode's germination budget already bounds the
parameters, so small cost weights keep the decision about *where* to grow (with the default
weights, a kernel on a tiny host costs more than it gains unless it lands at the bottleneck, and
the policy first learns to wait)."""

PRETRAINED_NAME = "bottleneck_gnn"
"""File stem of the shipped policy (``.safetensors`` weights, ``.json`` training record)."""


class PolicyTrainingConfig(ConfigModel):
    """Everything that determines a trained policy.

    Attributes:
        algorithm: ``"ppo"`` or ``"a2c"``.
        iterations: collect-then-update rounds.
        episodes_per_iteration: episodes collected per round.
        seed: training seed (episode seeds, exploration, minibatch order).
        episode: the episode schedule.
        policy: GNN hyperparameters.
        ppo: PPO hyperparameters.
        a2c: A2C hyperparameters.
    """

    algorithm: Literal["ppo", "a2c"] = "ppo"
    iterations: int = Field(default=16, ge=0)
    episodes_per_iteration: int = Field(default=24, ge=1)
    seed: int = 0
    episode: EpisodeConfig = Field(
        default_factory=lambda: EpisodeConfig(reward_weights=BUDGETED_REWARD)
    )
    policy: GNNPolicyConfig = Field(default_factory=GNNPolicyConfig)
    ppo: PPOConfig = Field(
        default_factory=lambda: PPOConfig(
            learning_rate=2e-3, gamma=1.0, gae_lambda=1.0, update_epochs=4, minibatch_size=12
        )
    )
    a2c: A2CConfig = Field(
        default_factory=lambda: A2CConfig(learning_rate=1e-3, gamma=1.0, norm_adv=True)
    )

    def training_seed(self, iteration: int, episode: int) -> int:
        """Episode seed of one training episode (disjoint from :data:`HELD_OUT_SEEDS`)."""
        return self.seed * 100_000 + iteration * self.episodes_per_iteration + episode


@dataclass(frozen=True)
class IterationLog:
    """One round of training: what was collected and what the update reported."""

    iteration: int
    mean_reward: float
    hit_rate: float | None
    wait_rate: float
    stats: dict[str, float]
    seconds: float


@dataclass(frozen=True)
class EvaluationSummary:
    """A policy on a set of episodes, with its actions taken greedily.

    Attributes:
        policy: its name.
        episodes: number of episodes.
        hit_rate: fraction whose first germination was at the known bottleneck (None: unknown).
        germination_rate: fraction that germinated at all.
        mean_val_loss: mean final validation loss (NaN when episodes stop at the decision).
        mean_reward: mean episode reward.
        mean_added_parameters: mean parameters grafted per episode.
        results: the episodes.
    """

    policy: str
    episodes: int
    hit_rate: float | None
    germination_rate: float
    mean_val_loss: float
    mean_reward: float
    mean_added_parameters: float
    results: list[EpisodeResult]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def evaluate_policy(
    task: GrowthTask,
    policy: GrowthPolicy,
    seeds: Sequence[int],
    *,
    episode: EpisodeConfig | None = None,
) -> EvaluationSummary:
    """Run ``policy`` greedily on the episodes ``seeds`` of ``task`` and summarise."""
    results = [run_episode(task, policy, seed=s, config=episode, explore=False) for s in seeds]
    known = [r for r in results if r.bottleneck is not None]
    return EvaluationSummary(
        policy=policy.name,
        episodes=len(results),
        hit_rate=_mean([float(r.hit_bottleneck) for r in known]) if known else None,
        germination_rate=_mean([float(bool(r.germinations)) for r in results]),
        mean_val_loss=_mean([r.val_loss_final for r in results]),
        mean_reward=_mean([r.reward.total for r in results]),
        mean_added_parameters=_mean([float(r.added_parameters) for r in results]),
        results=results,
    )


def reward_correlations(results: Sequence[EpisodeResult]) -> dict[str, ComponentCorrelation]:
    """How each reward component (and the total) tracked the final validation loss over episodes
    (Pearson and Spearman; a useful component correlates negatively)."""
    components = [{**r.reward.components, "total": r.reward.total} for r in results]
    return correlate_components(components, [r.val_loss_final for r in results])


@dataclass
class TrainingResult:
    """A trained policy and how training went."""

    policy: GNNPolicy
    config: PolicyTrainingConfig
    history: list[IterationLog]
    seconds: float


def train_policy(
    task: GrowthTask,
    config: PolicyTrainingConfig | None = None,
    *,
    on_iteration: Callable[[IterationLog], None] | None = None,
) -> TrainingResult:
    """Train a fresh GNN policy on ``task`` with PPO or A2C (see the module docstring)."""
    cfg = config or PolicyTrainingConfig()
    started = time.perf_counter()
    policy = GNNPolicy(cfg.policy, sample_seed=cfg.seed)
    trainer: PPOTrainer | A2CTrainer = (
        PPOTrainer(policy, cfg.ppo) if cfg.algorithm == "ppo" else A2CTrainer(policy, cfg.a2c)
    )
    history: list[IterationLog] = []
    buffer = RolloutBuffer()
    for iteration in range(cfg.iterations):
        tick = time.perf_counter()
        buffer.clear()
        results = []
        for e in range(cfg.episodes_per_iteration):
            result = run_episode(
                task,
                policy,
                seed=cfg.training_seed(iteration, e),
                config=cfg.episode,
                explore=True,
            )
            buffer.extend(result.transitions)
            results.append(result)
        stats: PPOStats | A2CStats = trainer.update(buffer)
        known = [r for r in results if r.bottleneck is not None]
        log = IterationLog(
            iteration=iteration,
            mean_reward=_mean([r.reward.total for r in results]),
            hit_rate=_mean([float(r.hit_bottleneck) for r in known]) if known else None,
            wait_rate=_mean([float(not r.germinations) for r in results]),
            stats={k: float(v) for k, v in asdict(stats).items()},
            seconds=time.perf_counter() - tick,
        )
        history.append(log)
        logger.info(
            "iteration %d: reward %.3f hit rate %s wait rate %.2f (%.1fs)",
            iteration,
            log.mean_reward,
            "n/a" if log.hit_rate is None else f"{log.hit_rate:.2f}",
            log.wait_rate,
            log.seconds,
        )
        if on_iteration is not None:
            on_iteration(log)
    return TrainingResult(policy, cfg, history, time.perf_counter() - started)


def training_record(result: TrainingResult, evaluation: EvaluationSummary | None) -> dict[str, Any]:
    """A JSON-able record of how a policy was trained (and how it did on held-out episodes)."""
    record: dict[str, Any] = {
        "config": result.config.model_dump(mode="json"),
        "history": [asdict(log) for log in result.history],
        "training_seconds": result.seconds,
        "torch": torch.__version__,
    }
    if evaluation is not None:
        record["held_out"] = {
            "episodes": evaluation.episodes,
            "hit_rate": evaluation.hit_rate,
            "germination_rate": evaluation.germination_rate,
        }
    return record


def main(argv: Sequence[str] | None = None) -> None:
    """Train the bottleneck policy and write ``<out>/bottleneck_gnn.{safetensors,json}``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PRETRAINED_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held-out", type=int, default=100, help="held-out episodes to score")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)  # this recipe's progress; not every layer's health alerts
    torch.set_num_threads(1)
    task = BottleneckTask()
    result = train_policy(task, PolicyTrainingConfig(seed=args.seed))
    check = EpisodeConfig(steps_after=0)
    evaluation = evaluate_policy(
        task, result.policy, list(HELD_OUT_SEEDS[: args.held_out]), episode=check
    )
    args.out.mkdir(parents=True, exist_ok=True)
    record = training_record(result, evaluation)
    result.policy.save(args.out / f"{PRETRAINED_NAME}.safetensors", extra={"seed": args.seed})
    (args.out / f"{PRETRAINED_NAME}.json").write_text(json.dumps(record, indent=2) + "\n")
    logger.info("held-out hit rate %.3f over %d episodes", evaluation.hit_rate, evaluation.episodes)


if __name__ == "__main__":
    main()
