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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper.errors import ConfigurationError

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
        """Make ``<root>/<run_id>/``.

        Raises:
            ConfigurationError: the folder exists already (resume it or choose another id).
        """
        path = Path(root) / run_id
        if path.exists():
            raise ConfigurationError(
                f"run folder {path} exists already; resume it with "
                f"`esper train --resume {path}` or choose another run.id"
            )
        path.mkdir(parents=True)
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
        """Complete checkpoints as ``(epoch, folder)``, oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = []
        for child in self.checkpoints_dir.iterdir():
            if child.name.startswith(CHECKPOINT_PREFIX) and (child / "state.json").is_file():
                try:
                    found.append((int(child.name.removeprefix(CHECKPOINT_PREFIX)), child))
                except ValueError:
                    continue
        return sorted(found)

    def read_info(self) -> dict[str, Any]:
        """``run.json`` (empty if not written yet)."""
        try:
            return dict(json.loads(self.info_path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def write_info(self, **fields: Any) -> None:
        """Update ``run.json`` with ``fields`` (atomically)."""
        info = {**self.read_info(), **fields}
        write_text_atomic(self.info_path, json.dumps(info, indent=2, default=str))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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


def list_runs(root: str | Path) -> list[RunListing]:
    """Every run folder under ``root``, newest first (by start time)."""
    root = Path(root)
    if not root.is_dir():
        return []
    rows = []
    for child in root.iterdir():
        if not (child / "config.yaml").is_file():
            continue
        info = RunFolder(child).read_info()
        rows.append(
            RunListing(
                run_id=child.name,
                path=child,
                status=str(info.get("status", "unknown")),
                dataset=str(info.get("dataset", "?")),
                host=str(info.get("host", "?")),
                epoch=int(info.get("epoch", 0)),
                epochs=int(info.get("epochs", 0)),
                test_score=info.get("test_score"),
                score_name=str(info.get("score_name", "score")),
                parameters=info.get("parameters"),
                seeds=str(info.get("seeds", "")),
                started_at=str(info.get("started_at", "")),
            )
        )
    return sorted(rows, key=lambda r: (r.started_at, r.run_id), reverse=True)
