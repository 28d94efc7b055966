"""The run loop behind ``esper train``: one readable recipe from config to grown model and report.

Run it with ``esper train --config configs/digits.yaml`` (``key=value`` overrides after it), or
from Python::

    from esper.tolaria import load_config, train
    result = train(load_config("configs/digits.yaml", overrides=["train.epochs=2"]))

:func:`train` reads top to bottom: preflight (the whole config checked), setup (run folder,
growth services, model, optimizer, growth driver, resumed state, replica), the epochs, the
finish. What one step does, in order::

    forward, loss, backward, optimizer step
    replica.step(graftable=...)           step boundary: graft the kernels due now, ramp alphas
    growth.after_step(step, loss, ...)    apply decisions: compile (background), load, evaluate
                                          grafts, reward, fossilize or cull; telemetry and
                                          progress to the controller link; its new decisions
    log.step(...)                         seed changes, events, the step record

The step's loss stays a device tensor: it is read on the host only where a number is needed (the
``step`` record every ``train.log_every`` steps, a telemetry report, the end of a graft's
evaluation window, the epoch's end), so a step on an accelerator never waits for the device.

and every epoch: evaluate on the test split, write the epoch record, save a checkpoint.

A run resumed from a checkpoint repeats the uninterrupted run bit for bit: weights, optimizer
state, data order, torch's global RNG and every metric except the timings (why growth allows
this: :mod:`esper.tolaria.growth`).
"""

from __future__ import annotations

import logging
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from esper.core import MorphableModel
from esper.core.lockstep import broadcast_json
from esper.errors import ConfigurationError
from esper.tasks.evaluation import evaluate, score_name, task_loss
from esper.tolaria.bounded_input import clip
from esper.tolaria.builders import build_model, build_optimizer
from esper.tolaria.checkpoint import (
    Checkpoint,
    ResumePoint,
    capture,
    restore_run,
    save_checkpoint,
)
from esper.tolaria.config import RunConfig
from esper.tolaria.distributed import RankContext, TrainingReplica
from esper.tolaria.growth import GrowthDriver
from esper.tolaria.growth_services import GrowthServices
from esper.tolaria.metrics import MetricsLog
from esper.tolaria.preflight import PreparedRun, prepare_run
from esper.tolaria.progress import RunObserver, SilentObserver
from esper.tolaria.report import summarize, write_report
from esper.tolaria.resume import ResumePlan, RunInterrupted, plan_resume
from esper.tolaria.run_folder import RunFolder, new_run_id, write_text_atomic
from esper.tolaria.step_log import StepLog, parameter_count

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """What a finished (or stopped) run left behind."""

    folder: RunFolder
    status: str
    epoch: int
    step: int
    test_loss: float
    test_score: float
    parameters: int
    model: MorphableModel
    primary: bool = True
    """False on ranks other than 0 of a distributed run (their folder was a scratch one)."""


def train(
    config: RunConfig,
    *,
    resume: str | Path | None = None,
    resume_epoch: int | None = None,
    observer: RunObserver | None = None,
    stop_after_epoch: int | None = None,
    command: str | None = None,
) -> RunResult:
    """Train a run from ``config`` (or continue the run folder ``resume``) and write its report.

    Args:
        config: the run config (for ``resume``, the folder's saved config, possibly overridden).
        resume: a run folder to continue from its latest intact checkpoint.
        resume_epoch: continue ``resume`` from this epoch's checkpoint instead (later ones are
            renamed ``epoch-<k>.superseded``).
        observer: receives progress (the CLI's rich view); silent by default.
        stop_after_epoch: stop (status ``interrupted``) after this epoch's checkpoint, as if the
            run had been killed there; ``--resume`` continues it.
        command: the command line to record in ``run.json`` (default: ``sys.argv``).

    Returns:
        The run's folder, final numbers and the trained model.

    Raises:
        ConfigurationError: the config cannot run, or ``resume`` is complete already.
        DamagedCheckpointError: ``resume`` has no intact checkpoint to continue from.
        RunInterrupted: Ctrl-C; the run recorded where it stopped and ``--resume`` continues it.
    """
    if stop_after_epoch is not None and stop_after_epoch < 1:
        raise ConfigurationError(f"stop_after_epoch must be >= 1, got {stop_after_epoch}")
    torch.set_num_threads(config.run.threads)
    started = time.perf_counter()
    ranks = RankContext.from_environment()  # under torchrun: one replica per rank
    is_main = ranks is None or ranks.is_main
    observer = observer if observer is not None and is_main else SilentObserver()  # rank 0's

    # -- preflight: the whole config is checked before anything is created --------------------
    plan = plan_resume(resume, config=config, epoch=resume_epoch) if resume is not None else None
    if plan is not None and plan.completed:
        raise ConfigurationError(plan.message)
    prepared = prepare_run(config, resume=plan)
    for warning in prepared.warnings:
        observer.on_notice(warning, warning=True)

    # -- setup: run folder, growth, model, optimizer, resumed state, replica -------------------
    folder = _open_run_folder(config, plan, prepared, ranks, command=command)
    run = _set_up(config, plan, prepared, folder, ranks, observer)
    model, growth, replica, start = run.model, run.growth, run.replica, run.start
    data, batch_size, regression = prepared.data, config.data.batch_size, run.regression
    log = _start_log(folder, config, prepared, run, observer)  # run.json, epoch 0, observer

    def wall_seconds() -> float:
        return start.wall_seconds + time.perf_counter() - started

    # -- the epochs ----------------------------------------------------------------------------
    status, interrupted = "failed", False
    epoch = finished_epoch = saved_epoch = start.epoch  # saved: the last checkpointed epoch
    test_loss = test_score = float("nan")
    try:
        for epoch in range(start.epoch + 1, config.train.epochs + 1):
            order = torch.randperm(len(data.x_train), generator=run.data_order)
            epoch_loss = torch.zeros(())
            for first in range(0, len(order), batch_size):
                compiling = growth.compiling() if growth else 0  # in flight as the step starts
                tic = time.perf_counter()
                batch = replica.shard(order[first : first + batch_size])  # this rank's share
                # -- one training step ------------------------------------------------------
                outputs, targets = replica(data.x_train[batch]), data.y_train[batch]
                loss = task_loss(outputs, targets, regression=regression)
                run.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                run.optimizer.step()
                # -- step boundary: grafts due now join, alphas ramp; then growth advances ----
                graftable = growth.graftable(model.global_step + 1) if growth else None
                step = replica.step(graftable=graftable)
                loss_value = replica.step_loss(loss)  # stays on the device: no host sync per step
                events = growth.after_step(step, loss_value, replica) if growth else []
                step_ms = (time.perf_counter() - tic) * 1e3
                # -- bookkeeping (outside the timed step) -------------------------------------
                epoch_loss += loss.detach() * len(batch)
                compiling = max(compiling, growth.compiling()) if growth else 0
                log.step(step, epoch, loss_value, outputs, targets, step_ms, compiling, events)

            # -- end of epoch: evaluate, log, checkpoint -----------------------------------------
            test_loss, test_score = evaluate(model, data.x_test, data.y_test, regression=regression)
            train_loss = float(epoch_loss) / len(order)  # the mean over this rank's examples
            record = log.epoch(epoch, train_loss, test_loss, test_score, wall_s=wall_seconds())
            wall = wall_seconds()
            if config.train.checkpoint and is_main:
                save_checkpoint(folder.checkpoint_dir(epoch), run.capture(epoch, wall))
                saved_epoch = epoch
            run.metrics.flush()
            folder.write_info(**_epoch_info(record), wall_seconds=wall)
            observer.on_epoch(record)
            finished_epoch = epoch
            if stop_after_epoch is not None and epoch >= stop_after_epoch < config.train.epochs:
                status = "interrupted"
                break
        else:
            status = "completed"
        if replica.lockstep is not None:
            folder.write_info(**replica.summary())
    except KeyboardInterrupt:
        status, interrupted = "interrupted", True
    finally:  # -- the finish: what happened is recorded, everything started is stopped ------
        run.metrics.flush()
        folder.write_info(status=status, wall_seconds=wall_seconds())
        _close_run(status, folder, model, growth, replica, observer)
    if interrupted:
        reached = max(finished_epoch, saved_epoch)  # stopped after the checkpoint, before the rest
        raise RunInterrupted(
            folder,
            epoch=reached,
            step=model.global_step,
            phase="training",
            checkpointed=reached > 0 and saved_epoch == reached,
        )
    return RunResult(
        folder=folder,
        status=status,
        epoch=epoch,
        step=model.global_step,
        test_loss=test_loss,
        test_score=test_score,
        parameters=parameter_count(model),
        model=model,
        primary=is_main,
    )


# -- setup and finish, as train() calls them -----------------------------------------------------


@dataclass(frozen=True)
class _Run:
    """What setup built for the epochs."""

    model: MorphableModel
    optimizer: torch.optim.Optimizer
    growth: GrowthDriver | None
    replica: TrainingReplica
    data_order: torch.Generator
    metrics: MetricsLog
    start: ResumePoint
    regression: bool

    def capture(self, epoch: int, wall_seconds: float) -> Checkpoint:
        """The run's state after ``epoch`` (live tensors: save it before training on)."""
        return capture(
            epoch=epoch,
            step=self.model.global_step,
            model=self.model,
            optimizer=self.optimizer,
            data_generator=self.data_order,
            metrics_position=self.metrics.position(),
            growth=self.growth.state_dict() if self.growth else None,
            extra={"wall_seconds": wall_seconds},
        )


def _set_up(
    config: RunConfig,
    plan: ResumePlan | None,
    prepared: PreparedRun,
    folder: RunFolder,
    ranks: RankContext | None,
    observer: RunObserver,
) -> _Run:
    """Growth services (first: a compile worker process starts up meanwhile), the model, its
    optimizer, the growth driver, the resumed state (:func:`restore_run`), the warm-up and the
    replica. A failure or Ctrl-C closes what was started and is recorded in ``run.json``."""
    data = prepared.data
    services: GrowthServices | None = None
    growth: GrowthDriver | None = None
    try:
        if config.growth.enabled:
            services = GrowthServices.open(config, log_dir=folder.path)
        model = build_model(config, data, **(services.wrap_options() if services else {}))
        optimizer = build_optimizer(config.train, model)
        if services is not None and prepared.policy is not None:
            growth = GrowthDriver.build(
                config,
                services,
                model,
                run_id=folder.run_id,
                policy=prepared.policy,
                total_steps=-(-len(data.x_train) // config.data.batch_size) * config.train.epochs,
                validate=_validation(model, prepared),
            )
        data_order = torch.Generator().manual_seed(config.run.seed)
        metrics = MetricsLog(folder.metrics_path)
        start = restore_run(
            prepared.checkpoint,
            resumed=plan is not None,
            model=model,
            optimizer=optimizer,
            data_generator=data_order,
            metrics=metrics,
            growth=growth,
        )
        if growth is not None and config.growth.warm_start:
            folder.write_info(warm_up_seconds=_warm_up(growth, observer))  # before step 1
        replica = TrainingReplica(model, ranks)
    except BaseException as exc:
        raise _setup_failed(exc, folder, growth or services, prepared) from None
    return _Run(model, optimizer, growth, replica, data_order, metrics, start, data.is_regression)


def _open_run_folder(
    config: RunConfig,
    plan: ResumePlan | None,
    prepared: PreparedRun,
    ranks: RankContext | None,
    *,
    command: str | None,
) -> RunFolder:
    """The run's folder (rank 0's; the other ranks of a distributed run get a scratch folder
    under the same run id, removed at the end)."""
    if ranks is None:
        return _main_run_folder(config, plan, prepared, command=command)
    folder = _main_run_folder(config, plan, prepared, command=command) if ranks.is_main else None
    run_id = broadcast_json(folder.run_id if folder is not None else None)
    return folder or RunFolder.create(tempfile.mkdtemp(prefix="esper-rank-"), run_id)


def _main_run_folder(
    config: RunConfig, plan: ResumePlan | None, prepared: PreparedRun, *, command: str | None
) -> RunFolder:
    """A new folder with its ``config.yaml``, or the resumed one, whose checkpoints after the one
    it continues from are set aside (damaged, or superseded by ``--epoch``)."""
    command = command or shlex.join(["esper", *sys.argv[1:]])
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    if plan is None:
        folder = RunFolder.create(config.run.dir, config.run.id or new_run_id(config.run.name))
        write_text_atomic(folder.config_path, config.to_yaml())
        folder.write_info(run_id=folder.run_id, status="starting", command=command, started_at=now)
        return folder
    folder = plan.folder
    resumed = prepared.checkpoint.epoch if prepared.checkpoint is not None else 0
    reason = "superseded" if plan.epoch is not None else "damaged"
    for epoch, path in folder.checkpoints():
        if epoch > resumed:
            logger.warning("%s set aside as %s", path, folder.set_aside(path, reason).name)
    info = folder.read_info()
    folder.write_info(
        status="starting",
        command=info.get("command") or command,  # the command that started the run
        started_at=info.get("started_at") or now,
        error=None,
        resumes=[*info.get("resumes", []), {"command": command, "at": now, "epoch": resumed}],
    )
    return folder


def _validation(
    model: MorphableModel, prepared: PreparedRun
) -> Callable[[], dict[str, float]] | None:
    """The validation hook growth rewards use (``None`` without validation examples)."""
    data, x_val, y_val = prepared.data, prepared.x_val, prepared.y_val
    if not len(x_val):
        return None

    def validate() -> dict[str, float]:
        loss, score = evaluate(model, x_val, y_val, regression=data.is_regression)
        return {"loss": loss} if data.is_regression else {"loss": loss, "accuracy": score}

    return validate


def _warm_up(growth: GrowthDriver, observer: RunObserver) -> float:
    """Wait for the queued compiles before step 1, telling the observer; the seconds waited."""

    def progress(done: int, total: int) -> None:
        kernels = f"{total} catalog kernel{'s' if total != 1 else ''}"
        where = " in a Tezzeret worker process" if growth.services.worker.mode == "process" else ""
        observer.on_status(f"warm-up: compiling {kernels}{where}… {done}/{total} done")

    waited = growth.warm_up(on_progress=progress)
    observer.on_status("")
    observer.on_notice(f"warm-up: the catalog kernels were ready after {waited:.1f} s")
    return waited


def _setup_failed(
    exc: BaseException,
    folder: RunFolder,
    growth: GrowthDriver | GrowthServices | None,
    prepared: PreparedRun,
) -> BaseException:
    """Close what setup started and record the failure; return what to raise (Ctrl-C: a
    :class:`RunInterrupted` that says how to resume)."""
    if growth is not None:
        growth.close()
    if isinstance(exc, KeyboardInterrupt):
        epoch = prepared.checkpoint.epoch if prepared.checkpoint is not None else 0
        folder.write_info(status="interrupted", epoch=epoch)
        return RunInterrupted(folder, epoch=epoch, step=0, phase="setup", checkpointed=epoch > 0)
    folder.write_info(status="failed", error=clip(str(exc) or type(exc).__name__, limit=300))
    return exc


def _start_log(
    folder: RunFolder, config: RunConfig, prepared: PreparedRun, run: _Run, observer: RunObserver
) -> StepLog:
    """Before the first epoch: ``run.json`` says what runs, on what, from which epoch; a new
    run's metrics get its epoch-0 evaluation and initial seed states; the observer hears the
    run start. Returns the log the epochs write to."""
    model, data, epoch = run.model, prepared.data, run.start.epoch
    folder.write_info(
        run_id=folder.run_id,
        status="running",
        dataset=config.data.name,
        host=config.host.kind,
        policy=config.growth.policy if config.growth.enabled else "static",
        score_name=score_name(prepared.data),
        epochs=config.train.epochs,
        epoch=epoch,
        initial_parameters=sum(p.numel() for p in model.base_parameters()),
        layer_seeds={name: model.layer(name).num_seeds for name in model.layer_names},
    )
    log = StepLog(
        run.metrics,
        observer,
        model,
        log_every=config.train.log_every,
        regression=run.regression,
        score_name=score_name(data),
    )
    if epoch == 0:
        log.initial(*evaluate(model, data.x_test, data.y_test, regression=run.regression))
    observer.on_start(
        run_id=folder.run_id,
        epochs=config.train.epochs,
        steps_per_epoch=-(-len(data.x_train) // config.data.batch_size),
        start_epoch=epoch,
    )
    return log


def _epoch_info(record: dict[str, Any]) -> dict[str, Any]:
    """``run.json``'s progress fields from an ``epoch`` record."""
    return {
        "epoch": record["epoch"],
        "test_score": record["test_score"],
        "test_loss": record["test_loss"],
        "parameters": record["parameters"],
        "seeds": ", ".join(f"{n} {s.lower()}" for s, n in record["seeds"].items()),
    }


def _close_run(
    status: str,
    folder: RunFolder,
    model: MorphableModel,
    growth: GrowthDriver | None,
    replica: TrainingReplica,
    observer: RunObserver,
) -> None:
    """Stop growth and the kernel cache, tell the observer, write the report (rank 0, unless the
    run failed), leave the process group and remove a scratch folder."""
    is_main = replica.ranks is None or replica.ranks.is_main
    if growth is not None:
        folder.write_info(growth_counters=growth.counters())
        growth.close()
    cache = model.kernel_cache.stats()
    folder.write_info(kernel_cache={**cache.model_dump(mode="json"), "hit_rate": cache.hit_rate})
    model.kernel_cache.close()
    observer.on_end(status=status)
    if status != "failed" and is_main:
        write_report(folder.path)
        folder.write_info(summary=summarize(folder).as_dict())
    replica.close()
    if not is_main:
        shutil.rmtree(folder.path.parent, ignore_errors=True)  # the scratch folder
