"""Every run-config option has an effect a test can see: each test runs ``esper train`` (the
library's ``train``) with the option set and checks what the run did differently.

``growth.stop_fraction`` (no decision after that fraction of the steps), ``growth.precompile``
(the catalog compiled before step 1, or nothing), ``growth.warm_start`` (step 1 waits for the
queued compiles, or starts while they run), ``train.kernel_lr`` (the grafted kernels' parameter
groups), ``train.optimizer`` ``sgd``/``adamw`` (with ``momentum`` and ``weight_decay``) and
``train.log_every`` (a step record every N steps).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from esper.blueprints import create_artifact
from esper.contracts import BlueprintSpec, CompileJob, CompileJobStatus
from esper.execution import InMemoryArtifactSource
from esper.tolaria.builders import build_data, build_model, build_optimizer
from esper.tolaria.checkpoint import Checkpoint, load_checkpoint
from esper.tolaria.config import RunConfig, load_config
from esper.tolaria.metrics import read_metrics
from esper.tolaria.progress import RunObserver, SilentObserver
from esper.tolaria.trainer import RunResult, train
from esper.urza import open_library

STEPS_PER_EPOCH = -(-(1437 - int(1437 * 0.1)) // 64)  # digits' train split minus validation: 21

GROWTH = [
    "data.name=digits",
    "host.hidden=[16]",
    "host.activation=identity",  # a linear host: the bottleneck policy germinates at once
    "seeds.per_layer=3",
    "seeds.blend_steps=3",
    "growth.start_step=4",
    "growth.decide_every=4",
    "growth.graft_delay=2",
    "growth.evaluation_steps=4",
    "growth.cooldown_steps=0",
    "growth.max_parameter_fraction=100",
    "growth.max_adaptations=6",
    "urza.worker=thread",
    "train.epochs=2",
]
"""A run that germinates every 4 steps from step 4 until its 6 adaptations are spent (step 24)."""

STATIC = ["data.name=digits", "host.hidden=[16]", "growth.enabled=false", "train.epochs=1"]

NO_DECISIONS = [*GROWTH, "growth.start_step=1000"]
"""Growth enabled (compiles, warm-up), but no decision in its 42 steps."""


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


class StatusObserver(SilentObserver):
    """Keeps the status lines a run shows (the warm-up's progress among them)."""

    def __init__(self) -> None:
        self.statuses: list[str] = []

    def on_status(self, text: str) -> None:
        self.statuses.append(text)


def _train(root: Path, *overrides: str, observer: RunObserver | None = None) -> RunResult:
    config = load_config(overrides=[*overrides, f"run.dir={root}", "run.id=r"])
    return train(config, observer=observer or SilentObserver())


def _decision_steps(result: RunResult) -> list[int]:
    """Steps at which the controller decided (a decision or a refusal was recorded)."""
    path = result.folder.metrics_path
    decided = [*read_metrics(path, "decision"), *read_metrics(path, "refusal")]
    return sorted(record["step"] for record in decided)


def _final_checkpoint(result: RunResult) -> Checkpoint:
    return load_checkpoint(result.folder.checkpoints()[-1][1])


def _kernel_group_lrs(checkpoint: Checkpoint) -> list[float]:
    groups = zip(checkpoint.optimizer_groups, checkpoint.optimizer["param_groups"], strict=True)
    return [group["lr"] for tag, group in groups if tag is not None]


def _compile_jobs(root: Path) -> list[CompileJob]:
    library = open_library(run_dir=root / "urza")
    try:
        return library.list_jobs()
    finally:
        library.close()


def _run_info(result: RunResult) -> dict[str, Any]:
    info: dict[str, Any] = json.loads((result.folder.path / "run.json").read_text())
    return info


# -- growth.stop_fraction and train.kernel_lr ----------------------------------------------------


@pytest.fixture(scope="module")
def stopped_at_half(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("half")
    return _train(root, *GROWTH, "growth.stop_fraction=0.5", "train.kernel_lr=0.05")


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    torch.set_num_threads(1)
    return _train(tmp_path_factory.mktemp("whole"), *GROWTH, "growth.stop_fraction=1.0")


def test_stop_fraction_ends_the_decisions_at_that_fraction_of_the_steps(
    stopped_at_half: RunResult, whole_run: RunResult
) -> None:
    total = 2 * STEPS_PER_EPOCH
    assert stopped_at_half.step == whole_run.step == total

    assert _decision_steps(stopped_at_half) == [4, 8, 12, 16, 20]  # none after step 21
    assert _decision_steps(whole_run) == [4, 8, 12, 16, 20, 24]  # the 6th comes after it


def test_kernel_lr_is_the_learning_rate_of_every_grafted_kernels_group(
    stopped_at_half: RunResult, whole_run: RunResult
) -> None:
    half, whole = _final_checkpoint(stopped_at_half), _final_checkpoint(whole_run)

    assert half.optimizer_groups[0] is None  # the host's own group keeps train.lr
    assert half.optimizer["param_groups"][0]["lr"] == 0.01
    assert _kernel_group_lrs(half) == [0.05] * 5  # one group per graft
    assert _kernel_group_lrs(whole) == [0.01] * 6  # unset: the kernels get train.lr


def test_kernel_lr_applies_to_a_kernel_grafted_into_a_built_model() -> None:
    config = load_config(overrides=[*STATIC, "train.lr=0.002", "train.kernel_lr=0.3"])
    data, _, _ = build_data(config)
    source = InMemoryArtifactSource()
    model = build_model(config, data, kernel_source=source)
    optimizer = build_optimizer(config.train, model)
    spec = BlueprintSpec(family="lowrank_adapter", params={"rank": 2})
    artifact, metadata = create_artifact(spec, model.layer("fc1").target())
    source.add(artifact)

    model.load_kernel_sync("fc1", seed_idx=0, kernel_artifact_id=metadata.kernel_id)

    assert [group["lr"] for group in optimizer.param_groups] == [0.002, 0.3]
    model.kernel_cache.close()


# -- growth.precompile and growth.warm_start -----------------------------------------------------


@pytest.mark.parametrize(
    ("precompile", "warm_start"), [(True, True), (False, True), (True, False), (False, False)]
)
def test_precompile_queues_the_catalog_and_warm_start_waits_for_it_before_step_1(
    tmp_path: Path, precompile: bool, warm_start: bool
) -> None:
    flags = [f"growth.precompile={str(precompile).lower()}"]
    flags.append(f"growth.warm_start={str(warm_start).lower()}")
    observer = StatusObserver()

    result = _train(tmp_path, *NO_DECISIONS, *flags, observer=observer)

    jobs = _compile_jobs(tmp_path)  # no decision: every job is a precompile or the warm-up's
    steps = list(read_metrics(result.folder.metrics_path, "step"))
    warm_up = [text for text in observer.statuses if text.startswith("warm-up")]
    if precompile:  # every compatible catalog blueprint for each of fc1 and out
        assert len(jobs) > 2
        assert len({job.target for job in jobs}) == 2  # the two layers' geometries
    else:  # only warm_start's one warm-up compile
        assert len(jobs) == (1 if warm_start else 0)
    if warm_start:  # step 1 waited until every queued compile had finished
        assert all(job.status is CompileJobStatus.SUCCEEDED for job in jobs)
        assert steps[0]["compiling"] == 0
        assert "warm_up_seconds" in _run_info(result)
        assert (
            warm_up[-1]
            == f"warm-up: compiling {len(jobs)} catalog kernel"
            + ("s" if len(jobs) > 1 else "")
            + f"… {len(jobs)}/{len(jobs)} done"
        )
    else:  # training started at once
        assert "warm_up_seconds" not in _run_info(result) and warm_up == []


# -- train.optimizer (sgd, adamw) with momentum and weight_decay -------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("adam", torch.optim.Adam),
        ("adamw", torch.optim.AdamW),
        ("sgd", torch.optim.SGD),
    ],
)
def test_the_optimizer_option_builds_that_optimizer_with_its_settings(
    name: str, expected: type[torch.optim.Optimizer]
) -> None:
    overrides = [f"train.optimizer={name}", "train.weight_decay=0.01", "train.momentum=0.7"]
    config = load_config(overrides=[*STATIC, *overrides])
    data, _, _ = build_data(config)
    model = build_model(config, data)

    optimizer = build_optimizer(config.train, model)

    assert type(optimizer) is expected
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.01, 0.01)
    assert group.get("momentum") == (0.7 if name == "sgd" else None)
    model.kernel_cache.close()


def test_sgd_trains_with_momentum_and_weight_decay(tmp_path: Path) -> None:
    overrides = ["train.optimizer=sgd", "train.lr=0.1", "train.momentum=0.5"]
    result = _train(tmp_path, *STATIC, *overrides, "train.weight_decay=0.001")

    checkpoint = _final_checkpoint(result)
    group = checkpoint.optimizer["param_groups"][0]
    assert (group["momentum"], group["weight_decay"], group["lr"]) == (0.5, 0.001, 0.1)
    states = list(checkpoint.optimizer["state"].values())
    assert states and all(set(state) == {"momentum_buffer"} for state in states)
    losses = [r["loss"] for r in read_metrics(result.folder.metrics_path, "step")]
    assert sum(losses[-5:]) < sum(losses[:5])  # it learns


def test_adamw_decays_the_weights_it_updates(tmp_path: Path) -> None:
    decayed = _train(tmp_path / "decayed", *STATIC, "train.optimizer=adamw", "train.weight_decay=1")
    plain = _train(tmp_path / "plain", *STATIC, "train.optimizer=adamw", "train.weight_decay=0")

    def weight_norm(result: RunResult) -> float:
        return float(sum(p.detach().square().sum() for p in result.model.base_parameters()))

    states = list(_final_checkpoint(decayed).optimizer["state"].values())
    assert states and all({"exp_avg", "exp_avg_sq"} <= set(state) for state in states)
    assert weight_norm(decayed) < weight_norm(plain)  # decoupled decay shrinks the weights


# -- train.log_every -------------------------------------------------------------------------------


def test_log_every_writes_a_step_record_every_n_steps(tmp_path: Path) -> None:
    result = _train(tmp_path, *STATIC, "train.log_every=5")

    steps = [r["step"] for r in read_metrics(result.folder.metrics_path, "step")]
    epochs = list(read_metrics(result.folder.metrics_path, "epoch"))
    assert steps == [5, 10, 15, 20]  # of the 21 steps
    assert [e["epoch"] for e in epochs] == [1]  # epoch records are not thinned


def test_the_defaults_are_what_the_options_document() -> None:
    defaults = RunConfig()

    assert defaults.growth.stop_fraction == 0.8
    assert defaults.growth.precompile is True and defaults.growth.warm_start is True
    assert defaults.train.kernel_lr is None and defaults.train.log_every == 1
    assert defaults.train.optimizer == "adam"
