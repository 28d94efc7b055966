"""Resuming runs: what ``esper train --resume`` would continue, and how a stopped run says so.

:func:`plan_resume` reads only the run folder (``config.yaml``, ``run.json``, the checkpoint
names), so the command answers at once, before torch is imported: a completed run is reported
and left untouched, a missing ``--epoch`` is named. The checkpoint itself is validated and loaded
by :func:`esper.tolaria.checkpoint.load_resume_checkpoint` when the run starts.

A run stopped by Ctrl-C raises :class:`RunInterrupted` (a :class:`KeyboardInterrupt`) after it
has recorded its state, carrying where it stopped and the command that continues it.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from esper.errors import ConfigurationError
from esper.tolaria.config import RunConfig, load_config
from esper.tolaria.run_folder import RunFolder


def resume_config(folder: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """The saved config of a run folder with ``overrides`` applied (for ``--resume``)."""
    return load_config(RunFolder.open(folder).config_path, overrides=overrides)


@dataclass(frozen=True)
class ResumePlan:
    """What ``--resume`` of a run folder would do."""

    folder: RunFolder
    config: RunConfig
    epoch: int | None
    """The checkpoint asked for (``--epoch``); ``None``: the latest intact one."""
    completed: bool
    """The run already trained all its epochs: there is nothing to resume."""
    message: str = ""
    """For a completed run: what it reached and how to train it further."""


def plan_resume(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    epoch: int | None = None,
    config: RunConfig | None = None,
) -> ResumePlan:
    """Check a ``--resume`` request against the run folder (reads no tensor, writes nothing).

    A run is complete when ``run.json`` says ``completed`` and its epochs reach
    ``train.epochs`` (after ``overrides``: ``train.epochs=40`` extends a finished 30-epoch run).

    Args:
        path: the run folder.
        overrides: ``key=value`` overrides of its saved config.
        epoch: the checkpoint to continue from (``--epoch``); ``None``: the latest.
        config: the config to resume with, when already loaded (``overrides`` are then unused).

    Raises:
        ConfigurationError: ``path`` is not a run folder, its config or ``run.json`` is damaged,
            ``epoch`` is negative or beyond ``train.epochs``, or has no checkpoint.
    """
    folder = RunFolder.open(path)
    if config is None:
        config = load_config(folder.config_path, overrides=overrides)
    info = folder.read_info()
    epochs = config.train.epochs
    saved = [found for found, _ in folder.checkpoints()]
    if epoch is not None:
        if epoch not in saved:
            listed = ", ".join(map(str, saved)) or "none"
            raise ConfigurationError(
                f"run {folder.path} has no checkpoint of epoch {epoch} (checkpoints: {listed})"
            )
        if epoch >= epochs:
            raise ConfigurationError(
                f"--epoch {epoch} is the end of the run (train.epochs={epochs}); pass an earlier "
                f"epoch, or train further with train.epochs=<more>"
            )
        return ResumePlan(folder=folder, config=config, epoch=epoch, completed=False)
    reached = max([int(info.get("epoch", 0) or 0), *saved])
    if info.get("status") == "completed" and reached >= epochs:
        score = info.get("test_score")
        result = (
            f", test {info.get('score_name', 'score')} {score:.4f}"
            if isinstance(score, int | float)
            else ""
        )
        message = (
            f"run {folder.run_id} is already complete (epoch {reached} of {epochs}{result}); "
            f"nothing was changed. To train it longer: esper train --resume {folder.path} "
            f"train.epochs={epochs + 10}; to redo it from an epoch: --epoch N"
        )
        return ResumePlan(folder=folder, config=config, epoch=None, completed=True, message=message)
    return ResumePlan(folder=folder, config=config, epoch=None, completed=False)


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C after recording its state (``run.json`` says ``interrupted``).

    Args:
        folder: the run folder.
        epoch: the last epoch whose checkpoint was written (0: none yet).
        step: the step the run had reached.
        phase: ``"training"``, or ``"setup"`` when it stopped before step 1 (the warm-up).
        checkpointed: whether ``epoch`` has a checkpoint (``--resume`` continues from it);
            otherwise a resume starts the run over.
    """

    def __init__(
        self, folder: RunFolder, *, epoch: int, step: int, phase: str, checkpointed: bool
    ) -> None:
        super().__init__(f"run {folder.run_id} interrupted")
        self.folder = folder
        self.epoch = epoch
        self.step = step
        self.phase = phase
        self.checkpointed = checkpointed

    @property
    def resume_command(self) -> str:
        """The command that continues the run."""
        return shlex.join(["esper", "train", "--resume", str(self.folder.path)])

    def describe(self) -> str:
        """``stopped at epoch 8, step 170; resume with: esper train --resume runs/<id>``."""
        if self.phase == "setup":
            where = "stopped before training started (during the warm-up)"
        else:
            where = f"stopped at epoch {self.epoch}, step {self.step}"
            if not self.checkpointed:
                where += " (no checkpoint: a resume starts the run over)"
        return f"{where}; resume with: {self.resume_command}"
