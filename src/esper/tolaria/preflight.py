"""Preflight: everything a run config asks for, checked before the run creates anything.

:func:`prepare_run` loads the policy ``growth.policy`` names, checks that ``run.dir`` (and the
embedded library's folder) can be written, loads the dataset, builds the host once to check it
and the seeded layers, and for ``--resume`` validates and loads the checkpoint to continue from
(falling back past damaged ones). A bad value therefore fails with one clear error and no run
folder, library folder or worker process is left behind. A ``growth.controller: service`` run's
bus must answer too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from esper.errors import ConfigurationError
from esper.tamiyo.observation import GrowthPolicy
from esper.tasks.datasets import TensorSplit
from esper.tolaria.builders import build_data, build_model
from esper.tolaria.checkpoint import Checkpoint, load_resume_checkpoint
from esper.tolaria.config import RunConfig
from esper.tolaria.growth import load_run_policy
from esper.tolaria.resume import ResumePlan
from esper.tolaria.run_folder import check_writable_folder
from esper.tolaria.service_controller import check_controller_bus


@dataclass(frozen=True)
class PreparedRun:
    """What preflight loaded, for the run to use."""

    data: TensorSplit
    """The dataset, validation examples held out of its training split."""
    x_val: torch.Tensor
    y_val: torch.Tensor
    policy: GrowthPolicy | None
    """The controller's policy (``None`` without growth)."""
    checkpoint: Checkpoint | None = None
    """The checkpoint a resumed run continues from."""
    warnings: list[str] = field(default_factory=list)
    """Damaged checkpoints skipped on the way to ``checkpoint``."""


def prepare_run(config: RunConfig, *, resume: ResumePlan | None = None) -> PreparedRun:
    """Check ``config`` (and the checkpoint of ``resume``) before anything is created.

    Raises:
        ConfigurationError: a value the run cannot use (unknown policy, unwritable folder,
            a host that cannot be built on this data, unknown seeded layers, ...).
        DamagedCheckpointError: every checkpoint of the resumed run is damaged (or the one
            ``--epoch`` asks for is).
    """
    policy = load_run_policy(config) if config.growth.enabled else None
    if config.growth.enabled and config.growth.controller == "service":
        check_controller_bus(config.growth.bus)  # its Redis answers
    if resume is None:
        check_writable_folder(config.run.dir, setting="run.dir")
    if config.growth.enabled and config.urza.url is None:
        urza_dir = config.urza.dir or Path(config.run.dir) / "urza"
        check_writable_folder(urza_dir, setting="urza.dir" if config.urza.dir else "run.dir")
    data, x_val, y_val = build_data(config)
    build_model(config, data).kernel_cache.close()  # the host and its seeded layers, then dropped
    checkpoint: Checkpoint | None = None
    warnings: list[str] = []
    if resume is not None:
        checkpoint, warnings = load_resume_checkpoint(resume.folder, epoch=resume.epoch)
    if resume is not None and checkpoint is not None:
        _check_continuity(config, data, resume, checkpoint)
    return PreparedRun(data, x_val, y_val, policy, checkpoint, warnings)


def _check_continuity(
    config: RunConfig, data: TensorSplit, resume: ResumePlan, checkpoint: Checkpoint
) -> None:
    """The checkpoint must fit this config and the run's metrics log (before any file moves)."""
    steps_per_epoch = -(-len(data.x_train) // config.data.batch_size)
    if checkpoint.step != checkpoint.epoch * steps_per_epoch:
        raise ConfigurationError(
            f"the epoch-{checkpoint.epoch} checkpoint of {resume.folder.path} is at step "
            f"{checkpoint.step}, but with this config epoch {checkpoint.epoch} ends at step "
            f"{checkpoint.epoch * steps_per_epoch}: resume without overriding the data or "
            "data.batch_size"
        )
    metrics = resume.folder.metrics_path
    size = metrics.stat().st_size if metrics.is_file() else 0
    if size < checkpoint.metrics_position:
        raise ConfigurationError(
            f"{metrics} has {size} bytes but the epoch-{checkpoint.epoch} checkpoint expects at "
            f"least {checkpoint.metrics_position}; the metrics log was edited or replaced. "
            "Restore it or start a new run."
        )
