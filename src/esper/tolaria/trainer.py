"""The run loop behind ``esper train``: one readable recipe from config to grown model and report.

Run it with ``esper train --config configs/digits.yaml`` (``key=value`` overrides after it), or
from Python::

    from esper.tolaria import load_config, train
    result = train(load_config("configs/digits.yaml", overrides=["train.epochs=2"]))

What one step does, in order (see :func:`train`)::

    forward, loss, backward, optimizer step
    model.step(graftable=...)        step boundary: graft the kernels due now, ramp alphas
    growth.after_step(step, loss)    apply Tamiyo's decisions: compile (background), load,
                                     evaluate grafts, reward, fossilize or cull
    every telemetry_every steps:     model.collect_telemetry() -> Tamiyo's health collector
    every decide_every steps:        growth.decide(step): Tamiyo decides, synchronously

and every epoch: evaluate on the test split, write the epoch record, save a checkpoint.

Growth is deterministic in step: decisions happen at fixed step intervals and a kernel is grafted
exactly ``growth.graft_delay`` steps after its decision (see :mod:`esper.tolaria.growth`), so a
run resumed from a checkpoint repeats the uninterrupted run bit for bit: weights, optimizer
state, data order, torch's global RNG (kernels are built from private generators, so background
compiles and loads never draw from it) and every metric except the timings.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from esper.contracts import SeedState
from esper.core import MorphableModel
from esper.core.lockstep import LockstepGrowth, broadcast_json
from esper.errors import ConfigurationError
from esper.tasks.evaluation import evaluate, score_name, task_loss
from esper.tolaria.bounded_input import clip
from esper.tolaria.builders import build_model, build_optimizer
from esper.tolaria.checkpoint import capture, restore_optimizer, restore_rng, save_checkpoint
from esper.tolaria.config import RunConfig
from esper.tolaria.distributed import RankContext
from esper.tolaria.growth import GrowthDriver, build_growth
from esper.tolaria.metrics import MetricsLog
from esper.tolaria.preflight import PreparedRun, prepare_run
from esper.tolaria.progress import RunObserver, SilentObserver
from esper.tolaria.report import summarize, write_report
from esper.tolaria.resume import ResumePlan, RunInterrupted, plan_resume
from esper.tolaria.run_folder import RunFolder, new_run_id, write_text_atomic

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


# -- model state, as the loop reports it ---------------------------------------------------------


def seed_counts(model: MorphableModel) -> dict[str, int]:
    """Seeds by state name (host mirror, no device read)."""
    counts: Counter[str] = Counter()
    for name in model.layer_names:
        counts.update(state.name for state in model.layer(name).seed_states)
    return {state.name: counts[state.name] for state in SeedState if counts[state.name]}


def seed_snapshot(model: MorphableModel) -> dict[tuple[str, int], str]:
    """Every seed's state name, by ``(layer, seed)``."""
    return {
        (name, i): state.name
        for name in model.layer_names
        for i, state in enumerate(model.layer(name).seed_states)
    }


def batch_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of ``(B, C)`` logits whose argmax is the ``(B,)`` target."""
    return float((outputs.detach().argmax(dim=1) == targets).float().mean())


def parameter_count(model: MorphableModel) -> int:
    """Base plus grafted kernel parameters."""
    return sum(p.numel() for p in model.parameters())


# -- the loop --------------------------------------------------------------------------------------


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

    The config is checked whole before anything is created (:func:`prepare_run`).

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
    observer = observer or SilentObserver()
    torch.set_num_threads(config.run.threads)
    started = time.perf_counter()
    ranks = RankContext.from_environment()  # under torchrun: one replica per rank
    is_main = ranks is None or ranks.is_main
    if not is_main:
        observer = SilentObserver()  # rank 0 reports progress

    # -- preflight: the whole config is checked before anything is created --------------------
    plan = plan_resume(resume, config=config, epoch=resume_epoch) if resume is not None else None
    if plan is not None and plan.completed:
        raise ConfigurationError(plan.message)
    prepared = prepare_run(config, resume=plan)
    for warning in prepared.warnings:
        observer.on_notice(warning, warning=True)

    # -- run folder, growth, model, optimizer ---------------------------------------------------
    if is_main:
        folder = _open_run_folder(config, plan, prepared, command=command)
    run_id = broadcast_json(folder.run_id if is_main else None) if ranks else folder.run_id
    if not is_main:  # only rank 0 writes the run folder; the others keep a scratch one
        folder = RunFolder.create(tempfile.mkdtemp(prefix="esper-rank-"), run_id)
    checkpoint = prepared.checkpoint
    start_epoch = checkpoint.epoch if checkpoint is not None else 0
    growth: GrowthDriver | None = None
    try:
        if config.growth.enabled:  # first: a compile worker process starts up meanwhile
            growth = build_growth(
                config, run_id=run_id, log_dir=folder.path, policy=prepared.policy
            )
        data, x_val, y_val = prepared.data, prepared.x_val, prepared.y_val
        regression = data.is_regression
        batch_size = config.data.batch_size
        steps_per_epoch = -(-len(data.x_train) // batch_size)
        total_steps = steps_per_epoch * config.train.epochs
        model = build_model(config, data, **(growth.wrap_options() if growth else {}))
        optimizer = build_optimizer(config.train, model)
        if growth is not None:

            def validate() -> dict[str, float]:
                loss, score = evaluate(model, x_val, y_val, regression=regression)
                return {"loss": loss, "accuracy": score} if not regression else {"loss": loss}

            growth.attach(model, total_steps=total_steps, validate=validate if len(x_val) else None)
        data_order = torch.Generator().manual_seed(config.run.seed)
        metrics = MetricsLog(folder.metrics_path)

        wall_before = 0.0
        if checkpoint is not None:
            # a fresh wrap re-grafts the checkpoint's kernels, which re-adds their optimizer groups
            model.load_state_dict(checkpoint.model)
            restore_optimizer(optimizer, checkpoint)
            restore_rng(checkpoint, data_order)
            if growth is not None:
                growth.load_state_dict(checkpoint.growth)
            metrics.truncate(checkpoint.metrics_position)
            wall_before = float(checkpoint.extra.get("wall_seconds", 0.0))
            logger.info("resumed %s from epoch %d (step %d)", run_id, start_epoch, checkpoint.step)
        elif plan is not None:
            metrics.truncate(0)  # interrupted before its first checkpoint: start over
        if growth is not None and config.growth.warm_start:
            warm_up = _warm_up(growth, model, observer)  # before step 1: no stall
            folder.write_info(warm_up_seconds=warm_up)
        lockstep = LockstepGrowth(model) if ranks else None
        trained: torch.nn.Module = lockstep.ddp() if lockstep else model
    except BaseException as exc:  # setup failed: stop the compile worker it may have started
        if growth is not None:
            growth.close()
        if isinstance(exc, KeyboardInterrupt):
            folder.write_info(status="interrupted", epoch=start_epoch)
            raise RunInterrupted(
                folder, epoch=start_epoch, step=0, phase="setup", checkpointed=start_epoch > 0
            ) from None
        folder.write_info(status="failed", error=clip(str(exc) or type(exc).__name__, limit=300))
        raise

    layer_seeds = {name: model.layer(name).num_seeds for name in model.layer_names}
    initial_parameters = sum(p.numel() for p in model.base_parameters())
    folder.write_info(
        run_id=folder.run_id,
        status="running",
        dataset=config.data.name,
        host=config.host.kind,
        policy=config.growth.policy if config.growth.enabled else "static",
        score_name=score_name(data),
        epochs=config.train.epochs,
        epoch=start_epoch,
        initial_parameters=initial_parameters,
        layer_seeds=layer_seeds,
    )
    if start_epoch == 0:
        test_loss, test_score = evaluate(model, data.x_test, data.y_test, regression=regression)
        metrics.write("eval", epoch=0, step=0, test_loss=test_loss, test_score=test_score)
        for (layer, seed), state in seed_snapshot(model).items():
            metrics.write("seed", step=0, layer=layer, seed=seed, state=state)

    observer.on_start(
        run_id=folder.run_id,
        epochs=config.train.epochs,
        steps_per_epoch=steps_per_epoch,
        start_epoch=start_epoch,
    )
    status = "failed"
    interrupted = False
    epoch = finished_epoch = start_epoch
    saved_epoch = start_epoch  # the last epoch with a checkpoint (0: none)
    test_loss = test_score = float("nan")
    states = seed_snapshot(model)
    parameters = parameter_count(model)
    try:
        for epoch in range(start_epoch + 1, config.train.epochs + 1):
            order = torch.randperm(len(data.x_train), generator=data_order)
            epoch_loss = torch.zeros(())
            for start in range(0, len(order), batch_size):
                compiling = growth.compiling() if growth else 0  # in flight as the step starts
                tic = time.perf_counter()
                batch = order[start : start + batch_size]
                if ranks is not None:
                    batch = ranks.shard(batch)  # this rank's share of the global batch
                # -- one training step ------------------------------------------------------
                outputs = trained(data.x_train[batch])
                loss = task_loss(outputs, data.y_train[batch], regression=regression)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                # -- step boundary: grafts due now join, alphas ramp --------------------------
                graftable = growth.graftable(model.global_step + 1) if growth else None
                if lockstep is None:
                    step = model.step(graftable=graftable)
                else:  # every rank grafts the same kernels at the same boundary
                    if lockstep.step(allowed=graftable):
                        trained = lockstep.ddp()  # DDP registers parameters when it is built
                    step = model.global_step
                loss_value = ranks.mean(loss) if ranks else float(loss.detach())
                events: list[dict[str, Any]] = []
                if growth is not None:
                    events += growth.after_step(step, loss_value)  # decisions applied, rewards
                    if step % config.growth.telemetry_every == 0:
                        signals = lockstep.collect_telemetry() if lockstep else None
                        growth.observe_telemetry(step, signals or model.collect_telemetry())
                    if growth.is_decision_step(step):
                        events += growth.decide(step, lockstep=lockstep)  # Tamiyo, in step
                step_ms = (time.perf_counter() - tic) * 1e3
                # -- bookkeeping (outside the timed step) -------------------------------------
                epoch_loss += loss.detach() * len(batch)
                new_states = seed_snapshot(model)
                if new_states != states:
                    for key, state in new_states.items():
                        if states.get(key) != state:
                            metrics.write("seed", step=step, layer=key[0], seed=key[1], state=state)
                    states = new_states
                    parameters = parameter_count(model)
                for event in events:
                    metrics.write(event["type"], **{k: v for k, v in event.items() if k != "type"})
                    observer.on_event(event)
                counts = seed_counts(model)
                if step % config.train.log_every == 0:
                    metrics.write(
                        "step",
                        step=step,
                        epoch=epoch,
                        loss=loss_value,
                        accuracy=None
                        if regression
                        else batch_accuracy(outputs, data.y_train[batch]),
                        step_time_ms=step_ms,
                        parameters=parameters,
                        seeds=counts,
                        compiling=max(compiling, growth.compiling()) if growth else 0,
                    )
                observer.on_step(step=step, loss=loss_value, seeds=counts)

            # -- end of epoch: evaluate, log, checkpoint -----------------------------------------
            test_loss, test_score = evaluate(model, data.x_test, data.y_test, regression=regression)
            counts = seed_counts(model)
            record: dict[str, Any] = {
                "epoch": epoch,
                "step": model.global_step,
                "train_loss": float(epoch_loss) / len(order),
                "test_loss": test_loss,
                "test_score": test_score,
                "score_name": score_name(data),
                "parameters": parameter_count(model),
                "seeds": counts,
                "layers": {n: [s.name for s in model.layer(n).seed_states] for n in layer_seeds},
                "wall_s": wall_before + time.perf_counter() - started,
            }
            metrics.write("epoch", **record)
            wall = wall_before + time.perf_counter() - started
            if config.train.checkpoint and is_main:
                checkpoint = capture(
                    epoch=epoch,
                    step=model.global_step,
                    model=model,
                    optimizer=optimizer,
                    data_generator=data_order,
                    metrics_position=metrics.position(),
                    growth=growth.state_dict() if growth else None,
                    extra={"wall_seconds": wall},
                )
                save_checkpoint(folder.checkpoint_dir(epoch), checkpoint)
                saved_epoch = epoch
            metrics.flush()
            folder.write_info(
                epoch=epoch,
                test_score=test_score,
                test_loss=test_loss,
                parameters=record["parameters"],
                seeds=", ".join(f"{n} {s.lower()}" for s, n in counts.items()),
                wall_seconds=wall,
            )
            observer.on_epoch(record)
            finished_epoch = epoch
            if stop_after_epoch is not None and epoch >= stop_after_epoch < config.train.epochs:
                status = "interrupted"
                break
        else:
            status = "completed"
        if lockstep is not None:
            folder.write_info(
                world_size=lockstep.world_size, replicas_identical=lockstep.replicas_identical()
            )
    except KeyboardInterrupt:
        status = "interrupted"
        interrupted = True
    finally:
        metrics.flush()
        folder.write_info(status=status, wall_seconds=wall_before + time.perf_counter() - started)
        if growth is not None:
            folder.write_info(growth_counters=growth.counters())
            growth.close()
        model.kernel_cache.close()
        observer.on_end(status=status)
        if status != "failed" and is_main:
            write_report(folder.path)
            folder.write_info(summary=summarize(folder).as_dict())
        if ranks is not None:
            ranks.close()
        if not is_main:
            shutil.rmtree(folder.path.parent, ignore_errors=True)  # the scratch folder
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


def _open_run_folder(
    config: RunConfig, plan: ResumePlan | None, prepared: PreparedRun, *, command: str | None
) -> RunFolder:
    """The run's folder: a new one with its ``config.yaml``, or the resumed one, whose checkpoints
    after the one it continues from are set aside (damaged, or superseded by ``--epoch``)."""
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


def _warm_up(growth: GrowthDriver, model: MorphableModel, observer: RunObserver) -> float:
    """Wait for the queued compiles before step 1, telling the observer; the seconds waited."""

    def progress(done: int, total: int) -> None:
        kernels = f"{total} catalog kernel{'s' if total != 1 else ''}"
        where = " in a Tezzeret worker process" if growth.worker_mode == "process" else ""
        observer.on_status(f"warm-up: compiling {kernels}{where}… {done}/{total} done")

    waited = growth.warm_up(model, on_progress=progress)
    observer.on_status("")
    observer.on_notice(f"warm-up: the catalog kernels were ready after {waited:.1f} s")
    return waited


def result_summary(result: RunResult) -> Mapping[str, Any]:
    """Plain-data view of a :class:`RunResult` (without the model)."""
    data = {
        f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.name != "model"
    }
    data["folder"] = str(result.folder.path)
    return data
