"""Run metrics: the ``metrics.jsonl`` log of a run, one JSON record per line.

Every record has a ``type``; the loop writes

* ``step`` — ``step``, ``epoch``, ``loss`` and ``accuracy`` of the training batch (``null`` for
  regression), ``step_time_ms``, ``parameters``, ``seeds`` (counts by state name), ``compiling``
  (compile jobs, or germinations looking up their kernel, in flight during the step);
* ``epoch`` — ``epoch``, ``step``, ``train_loss``, ``test_loss``, ``test_score`` (accuracy, or R²
  for regression), ``parameters``, ``seeds``, ``layers`` (seed states per layer), ``wall_s``;
* ``seed`` — a seed's new lifecycle state (``step``, ``layer``, ``seed``, ``state``);
* ``eval`` — the test loss and score before training (epoch 0);
* ``decision``, ``refusal``, ``graft``, ``reward``, ``fossilize``, ``cull`` — growth events with
  their ``step`` and the layer/seed they concern.

Records are buffered and flushed at epoch ends; :meth:`MetricsLog.position` is stored in each
checkpoint so a resumed run first cuts off whatever an interrupted run wrote after it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from esper.errors import ConfigurationError


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as ``null``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class MetricsLog:
    """Appends records to a JSONL file; buffered, flushed explicitly.

    Args:
        path: the ``metrics.jsonl`` file (created if missing, appended to otherwise).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch(exist_ok=True)
        self._buffer: list[str] = []

    def write(self, record_type: str, **fields: Any) -> None:
        """Queue one record ``{"type": record_type, **fields}``."""
        self._buffer.append(json.dumps({"type": record_type, **_clean(fields)}, sort_keys=False))

    def flush(self) -> None:
        """Append the queued records to the file."""
        if not self._buffer:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write("\n".join(self._buffer) + "\n")
        self._buffer.clear()

    def position(self) -> int:
        """Bytes written so far (flushes first): where a checkpoint's metrics end."""
        self.flush()
        return self.path.stat().st_size

    def truncate(self, position: int) -> None:
        """Drop everything after ``position`` (records of an interrupted run past a checkpoint)."""
        self._buffer.clear()
        size = self.path.stat().st_size
        if position > size:
            raise ConfigurationError(
                f"{self.path} has {size} bytes but the checkpoint expects at least {position}; "
                "the metrics log was edited or replaced. Restore it or start a new run."
            )
        with self.path.open("r+b") as handle:
            handle.truncate(position)


def read_metrics(path: str | Path, record_type: str | None = None) -> Iterator[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, optionally only those of one ``type``.

    A torn last line (a run killed mid-write) is skipped.
    """
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record_type is None or record.get("type") == record_type:
                yield record
