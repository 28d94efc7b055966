"""Run folders: the layout of ``runs/<run-id>/`` and the listing behind ``esper runs``.

::

    runs/<run-id>/
      config.yaml          the resolved run config (what --resume reads back)
      run.json             status, progress and headline numbers (updated every epoch)
      metrics.jsonl        step, epoch and growth records (see esper.tolaria.metrics)
      checkpoints/epoch-0003/{tensors.pt, state.json}
      report.md, plots/*.png
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from esper.errors import ConfigurationError
from esper.tolaria.bounded_input import clip

CHECKPOINT_PREFIX = "epoch-"


def new_run_id(name: str) -> str:
    """``<name>-<UTC yyyymmdd-hhmmss>-<4 hex>``: sortable by start time and unique."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    return f"{name}-{stamp}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class RunFolder:
    """Paths of one run's folder."""

    path: Path

    @property
    def run_id(self) -> str:
        """The folder's name."""
        return self.path.name

    @property
    def config_path(self) -> Path:
        """``config.yaml``."""
        return self.path / "config.yaml"

    @property
    def info_path(self) -> Path:
        """``run.json``."""
        return self.path / "run.json"

    @property
    def metrics_path(self) -> Path:
        """``metrics.jsonl``."""
        return self.path / "metrics.jsonl"

    @property
    def checkpoints_dir(self) -> Path:
        """``checkpoints/``."""
        return self.path / "checkpoints"

    @property
    def report_path(self) -> Path:
        """``report.md``."""
        return self.path / "report.md"

    @property
    def plots_dir(self) -> Path:
        """``plots/``."""
        return self.path / "plots"

    @classmethod
    def create(cls, root: str | Path, run_id: str) -> RunFolder:
        """Make ``<root>/<run_id>/`` (and ``root`` if needed).

        Raises:
            ConfigurationError: the folder exists already (resume it or choose another id), or
                it cannot be created there.
        """
        path = Path(root) / run_id
        if path.exists():
            raise ConfigurationError(
                f"run folder {path} exists already; resume it with "
                f"`esper train --resume {path}` or choose another run.id"
            )
        check_writable_folder(root, setting="run.dir")
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot create the run folder {path} ({exc.strerror or exc}); set run.dir to a "
                "writable folder"
            ) from None
        return cls(path)

    @classmethod
    def open(cls, path: str | Path) -> RunFolder:
        """An existing run folder.

        Raises:
            ConfigurationError: ``path`` is not a run folder.
        """
        folder = cls(Path(path))
        if not folder.config_path.is_file():
            raise ConfigurationError(
                f"{path} is not a run folder (no config.yaml); list runs with `esper runs`"
            )
        return folder

    def checkpoint_dir(self, epoch: int) -> Path:
        """``checkpoints/epoch-<epoch>`` (zero-padded)."""
        return self.checkpoints_dir / f"{CHECKPOINT_PREFIX}{epoch:04d}"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Checkpoint folders as ``(epoch, folder)``, oldest first (whether intact or not:
        :func:`esper.tolaria.checkpoint.load_checkpoint` says)."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = []
        for child in self.checkpoints_dir.iterdir():
            digits = child.name.removeprefix(CHECKPOINT_PREFIX)
            if digits != child.name and digits.isdigit() and child.is_dir():
                found.append((int(digits), child))
        return sorted(found)

    def set_aside(self, checkpoint: Path, reason: str) -> Path:
        """Rename a checkpoint folder to ``epoch-<k>.<reason>[-n]`` so that no resume picks it
        (a damaged one, or one a resume from an earlier epoch supersedes); nothing is deleted."""
        target = checkpoint.with_name(f"{checkpoint.name}.{reason}")
        counter = 1
        while target.exists():
            counter += 1
            target = checkpoint.with_name(f"{checkpoint.name}.{reason}-{counter}")
        checkpoint.rename(target)
        return target

    def read_info(self) -> dict[str, Any]:
        """``run.json`` (empty if not written yet).

        Raises:
            ConfigurationError: the file is not a JSON object (damaged or edited).
        """
        try:
            text = self.info_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(
                f"{self.info_path} cannot be read ({clip(str(exc))}); delete it to let the next "
                "resume rewrite it"
            ) from None
        try:
            info = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(
                f"{self.info_path} is not valid JSON ({clip(str(exc))}); delete it to let the "
                "next resume rewrite it"
            ) from None
        if not isinstance(info, dict):
            raise ConfigurationError(
                f"{self.info_path} should hold a JSON object, not a {type(info).__name__}; "
                "delete it to let the next resume rewrite it"
            )
        return info

    def write_info(self, **fields: Any) -> None:
        """Update ``run.json`` with ``fields`` (atomically)."""
        info = {**self.read_info(), **fields}
        write_text_atomic(self.info_path, json.dumps(info, indent=2, default=str))


def check_writable_folder(folder: str | Path, *, setting: str) -> None:
    """Check that files can be written in ``folder`` (it may not exist yet), creating nothing
    (a probe file is made and removed in the nearest existing folder).

    Args:
        folder: the folder.
        setting: the config key or option that named it, for the message (``run.dir``).

    Raises:
        ConfigurationError: ``folder`` (or the folder it would be created in) is a file, or is
            not writable.
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"cannot be created: {existing} is a file"
        raise ConfigurationError(
            f"{setting} {folder} {where}, not a folder; set {setting} to a folder"
        )
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".esper-write-check-")
    except OSError as exc:
        where = "is not writable" if existing == folder else f"cannot be created in {existing}"
        raise ConfigurationError(
            f"{setting} {folder} {where} ({exc.strerror or exc}); set {setting} to a writable "
            "folder"
        ) from None
    os.close(handle)
    os.unlink(probe)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class RunInfo(BaseModel):
    """The fields of ``run.json`` that ``esper runs`` shows (others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    status: str = "unknown"
    dataset: str = "?"
    host: str = "?"
    epoch: int = Field(default=0, ge=0)
    epochs: int = Field(default=0, ge=0)
    test_score: float | None = None
    score_name: str = "score"
    parameters: int | None = None
    seeds: str = ""
    started_at: str = ""


@dataclass(frozen=True)
class RunListing:
    """One row of ``esper runs``."""

    run_id: str
    path: Path
    status: str
    dataset: str
    host: str
    epoch: int
    epochs: int
    test_score: float | None
    score_name: str
    parameters: int | None
    seeds: str
    started_at: str
    problem: str | None = None
    """Why ``run.json`` could not be read (the row then shows what is known: the id)."""


def list_runs(root: str | Path) -> list[RunListing]:
    """Every run folder under ``root``, newest first (by start time); a run whose ``run.json``
    is damaged is listed with status ``unreadable`` and its ``problem``.

    Raises:
        ConfigurationError: ``root`` exists but is not a folder.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ConfigurationError(f"{root} is a file, not a folder of runs; pass --dir <folder>")
    if not root.is_dir():
        return []
    rows = []
    for child in root.iterdir():
        if not (child / "config.yaml").is_file():
            continue
        problem = None
        try:
            info = RunInfo.model_validate(RunFolder(child).read_info())
        except ConfigurationError as exc:
            info, problem = RunInfo(status="unreadable"), str(exc)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(part) for part in first["loc"])
            info = RunInfo(status="unreadable")
            problem = f"{RunFolder(child).info_path}: {clip(field, limit=40)}: {first['msg']}"
        rows.append(RunListing(run_id=child.name, path=child, problem=problem, **info.model_dump()))
    return sorted(rows, key=lambda r: (r.started_at, r.run_id), reverse=True)
