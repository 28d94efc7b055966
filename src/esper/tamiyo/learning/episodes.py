"""Growth episodes: a short training run of a small host in which a policy decides where to grow.

One episode (:func:`run_episode`)::

    instance = task.sample(seed)                      # host, data, known bottleneck (if any)
    model = wrap(host, kernel_source=InMemoryArtifactSource())
    for step in 1..total:
        train one minibatch; model.step()
        every telemetry_every steps: HealthCollector.ingest(model.collect_telemetry())
        at each decision step:
            graph = build_layer_graph(model, health, globals, mask restricted by the config)
            output = policy.act(graph, explore)
            germinate: compile the blueprint in process (create_artifact), load it into a
                       DORMANT seed through Kasmina (load_kernel_sync); it joins the optimizer
    reward = compute_reward(validation loss at the first decision -> at the end, parameters, ...)

The whole reward is given at the last decision (earlier decisions get 0; with ``gamma = 1`` the
return of every decision is the episode's outcome). Everything is seeded by the episode seed, so
an episode is reproducible on one machine.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch
from pydantic import Field, field_validator
from torch import nn

from esper.blueprints import create_artifact
from esper.contracts import SeedState
from esper.contracts.config_model import ConfigModel
from esper.core import MorphableModel, wrap
from esper.errors import ConfigurationError
from esper.execution import InMemoryArtifactSource
from esper.tamiyo.graph import GlobalState, build_layer_graph
from esper.tamiyo.health import HealthCollector
from esper.tamiyo.learning.growth_tasks import GrowthTask, TaskInstance
from esper.tamiyo.learning.rollout import Transition
from esper.tamiyo.observation import BLUEPRINT_CATALOG, GrowthPolicy, LayerGraph
from esper.tamiyo.reward import AdaptationOutcome, Reward, RewardWeights, compute_reward
from esper.tasks.evaluation import evaluate, task_loss

logger = logging.getLogger(__name__)

_OPTION_NAMES = [option.name for option in BLUEPRINT_CATALOG]


class EpisodeConfig(ConfigModel):
    """How an episode trains and when the policy decides.

    Attributes:
        warmup_steps: training steps before the first decision.
        decisions: decision points.
        decision_every: steps between decision points.
        steps_after: training steps after the last decision point (0: stop at the decision).
        batch_size: minibatch size.
        learning_rate: Adam learning rate (kernels get the same).
        seeds_per_layer: seeds of every wrapped layer.
        blend_steps: alpha ramp length of a grafted kernel.
        health_every: record layer health every this many steps (0: never).
        telemetry_every: flush telemetry into the health collector every this many steps.
        max_germinations: germinations allowed per episode (the parameter budget).
        allowed_options: catalog option names the policy may choose (``None``: all).
        reward_weights: weights of the episode's reward.

    Raises:
        ConfigurationError: a field out of its range, or an option the catalog does not have.
    """

    warmup_steps: int = Field(default=150, ge=1)
    decisions: int = Field(default=1, ge=1)
    decision_every: int = Field(default=50, ge=1)
    steps_after: int = Field(default=150, ge=0)
    batch_size: int = Field(default=64, ge=1)
    learning_rate: float = Field(default=0.02, gt=0)
    seeds_per_layer: int = Field(default=1, ge=1)
    blend_steps: int = Field(default=10, ge=1)
    health_every: int = Field(default=5, ge=0)
    telemetry_every: int = Field(default=10, ge=1)
    max_germinations: int = Field(default=1, ge=0)
    allowed_options: tuple[str, ...] | None = ("mlp_h32",)
    reward_weights: RewardWeights = Field(default_factory=RewardWeights)

    @field_validator("allowed_options")
    @classmethod
    def _catalog_options(cls, names: tuple[str, ...] | None) -> tuple[str, ...] | None:
        unknown = [n for n in names or () if n not in _OPTION_NAMES]
        if unknown:
            raise ValueError(
                f"unknown blueprint option(s) {unknown}; catalog options are {_OPTION_NAMES}"
            )
        return names

    @property
    def decision_steps(self) -> tuple[int, ...]:
        """Training steps after which the policy is asked."""
        return tuple(self.warmup_steps + i * self.decision_every for i in range(self.decisions))

    @property
    def total_steps(self) -> int:
        """Training steps of the whole episode."""
        return self.decision_steps[-1] + self.steps_after


@dataclass(frozen=True)
class Germination:
    """One kernel grafted during an episode."""

    step: int
    layer_name: str
    option: str
    seed_idx: int
    parameters: int


@dataclass
class EpisodeResult:
    """What happened in one episode.

    Attributes:
        task: task name.
        seed: episode seed.
        policy: name of the policy that decided.
        transitions: one per decision, rewards filled in (the last one is ``done``).
        germinations: kernels grafted, in order.
        bottleneck: the task's known bottleneck layer, if any.
        layer_names: the seeded layers, in graph order.
        val_loss_start: validation loss at the first decision point.
        val_loss_final: validation loss at the end.
        accuracy_start: validation accuracy at the first decision (classification only).
        accuracy_final: validation accuracy at the end (classification only).
        base_parameters: parameters of the host.
        added_parameters: parameters of grafted kernels.
        reward: the episode's multi-metric reward.
        wall_time_s: how long the episode took.
    """

    task: str
    seed: int
    policy: str
    transitions: list[Transition]
    germinations: list[Germination]
    bottleneck: str | None
    layer_names: tuple[str, ...]
    val_loss_start: float
    val_loss_final: float
    accuracy_start: float | None
    accuracy_final: float | None
    base_parameters: int
    added_parameters: int
    reward: Reward
    wall_time_s: float

    @property
    def hit_bottleneck(self) -> bool:
        """Whether the first germination was at the known bottleneck."""
        return bool(self.germinations) and self.germinations[0].layer_name == self.bottleneck


def _validate(model: nn.Module, instance: TaskInstance) -> tuple[float, float | None]:
    """Validation loss, and accuracy for a classification task (``None`` for regression)."""
    loss, score = evaluate(model, instance.x_val, instance.y_val, regression=instance.regression)
    return loss, None if instance.regression else score


def _restrict(graph: LayerGraph, config: EpisodeConfig, germinated: int) -> LayerGraph:
    """Apply the episode's option whitelist and germination budget to the mask."""
    mask = graph.germinate_mask.clone()
    if config.allowed_options is not None:
        allowed = torch.tensor([name in config.allowed_options for name in _OPTION_NAMES])
        mask &= allowed.reshape(1, -1)
    if germinated >= config.max_germinations:
        mask[:] = False
    return dataclasses.replace(graph, germinate_mask=mask)


def _germinate(
    model: MorphableModel,
    source: InMemoryArtifactSource,
    layer_name: str,
    option: int,
    *,
    init_seed: int,
    step: int,
) -> Germination:
    """Compile the option's blueprint for the layer and graft it into a DORMANT seed."""
    layer = model.layer(layer_name)
    seed_idx = layer.seed_states.index(SeedState.DORMANT)
    data, meta = create_artifact(
        BLUEPRINT_CATALOG[option].spec, layer.target(), init_seed=init_seed
    )
    source.add(data)
    model.load_kernel_sync(layer_name, seed_idx=seed_idx, kernel_artifact_id=meta.kernel_id)
    return Germination(step, layer_name, _OPTION_NAMES[option], seed_idx, meta.parameter_count)


def run_episode(
    task: GrowthTask,
    policy: GrowthPolicy,
    *,
    seed: int,
    config: EpisodeConfig | None = None,
    explore: bool = False,
) -> EpisodeResult:
    """Run one growth episode of ``task`` (instance ``seed``) with ``policy`` deciding.

    Args:
        task: draws the host and data.
        policy: decides at every decision point (only allowed actions are possible).
        seed: episode seed (instance, minibatch order, kernel initialisation).
        config: training and decision schedule.
        explore: let the policy sample (training) instead of taking its best action.
    """
    cfg = config or EpisodeConfig()
    started = time.perf_counter()
    instance = task.sample(seed)
    source = InMemoryArtifactSource()
    model = wrap(
        instance.host,
        target_layers=nn.Linear,
        seeds_per_layer=cfg.seeds_per_layer,
        kernel_source=source,
        blend_steps=cfg.blend_steps,
        health_every=cfg.health_every,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    model.attach_optimizer(optimizer)
    collector = HealthCollector()
    batches = torch.Generator().manual_seed(seed)
    base_parameters = sum(p.numel() for p in model.base_parameters())
    decision_steps = set(cfg.decision_steps)
    first_decision = cfg.decision_steps[0]

    transitions: list[Transition] = []
    germinations: list[Germination] = []
    losses: list[float] = []
    loss_ema: float | None = None
    ema_at_flush: float | None = None
    loss_trend = 0.0
    val_start, acc_start = float("nan"), None
    n_train = instance.x_train.shape[0]
    for step in range(1, cfg.total_steps + 1):
        idx = torch.randint(0, n_train, (cfg.batch_size,), generator=batches)
        outputs = model(instance.x_train[idx])
        loss = task_loss(outputs, instance.y_train[idx], regression=instance.regression)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        losses.append(value)
        loss_ema = value if loss_ema is None else 0.9 * loss_ema + 0.1 * value
        if step == first_decision:
            val_start, acc_start = _validate(model, instance)  # before step(): health untouched
        model.step()
        if step % cfg.telemetry_every == 0:
            collector.ingest(model.collect_telemetry())
            if ema_at_flush is not None and ema_at_flush > 0:
                loss_trend = (loss_ema - ema_at_flush) / ema_at_flush
            ema_at_flush = loss_ema
        if step not in decision_steps:
            continue
        kernel_params = sum(g.parameters for g in germinations)
        state = GlobalState(
            progress=step / cfg.total_steps,
            kernel_parameter_fraction=kernel_params / base_parameters,
            adaptations=float(len(germinations)),
            loss=loss_ema,
            loss_trend=loss_trend,
        )
        graph = build_layer_graph(model, collector.summaries(), globals=state, step=step)
        graph = _restrict(graph, cfg, len(germinations))
        output = policy.act(graph, explore=explore)
        if not graph.action_mask()[output.action.index()]:
            raise ConfigurationError(
                f"policy {policy.name!r} chose action {output.action} that the mask forbids; "
                "a GrowthPolicy must only return allowed actions"
            )
        transitions.append(Transition.from_output(graph, output))
        action = output.action
        if action.node is not None and action.option is not None:
            germinations.append(
                _germinate(
                    model,
                    source,
                    graph.layer_names[action.node],
                    action.option,
                    init_seed=seed * 1000 + len(germinations),
                    step=step,
                )
            )

    val_final, acc_final = _validate(model, instance)
    added = sum(p.numel() for p in model.kernel_parameters())
    window = cfg.decision_every
    before = losses[max(0, first_decision - window) : first_decision]
    after = losses[germinations[0].step : germinations[0].step + window] if germinations else []
    faults = sum(
        layer.seed_layout.slots[i].error_count
        for layer in (model.layer(n) for n in model.layer_names)
        for i in range(layer.num_seeds)
    )
    outcome = AdaptationOutcome(
        val_loss_before=val_start,
        val_loss_after=val_final,
        base_parameters=base_parameters,
        added_parameters=added,
        accuracy_before=acc_start,
        accuracy_after=acc_final,
        # cost proxies, deterministic: parameters touched per example (MLP FLOPs scale with them)
        step_time_before=float(base_parameters),
        step_time_after=float(base_parameters + added),
        train_losses_before=tuple(before),
        train_losses_after=tuple(after),
        faults=faults,
    )
    reward = compute_reward(outcome, cfg.reward_weights)
    transitions[-1].reward = reward.total
    transitions[-1].done = True
    result = EpisodeResult(
        task=task.name,
        seed=seed,
        policy=policy.name,
        transitions=transitions,
        germinations=germinations,
        bottleneck=instance.bottleneck,
        layer_names=tuple(model.layer_names),
        val_loss_start=val_start,
        val_loss_final=val_final,
        accuracy_start=acc_start,
        accuracy_final=acc_final,
        base_parameters=base_parameters,
        added_parameters=added,
        reward=reward,
        wall_time_s=time.perf_counter() - started,
    )
    logger.debug(
        "episode %s/%d (%s): grew %s, val loss %.4f -> %.4f, reward %.3f",
        task.name,
        seed,
        policy.name,
        [g.layer_name for g in germinations] or "nothing",
        val_start,
        val_final,
        reward.total,
    )
    return result
