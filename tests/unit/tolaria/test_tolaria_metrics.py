"""The metrics log: buffered JSONL records, positions, truncation after a checkpoint, torn lines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from esper.errors import ConfigurationError
from esper.tolaria.metrics import MetricsLog, read_metrics


def test_records_are_buffered_until_flushed(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write("step", step=1, loss=0.5)

    assert list(read_metrics(log.path)) == []
    log.flush()
    assert list(read_metrics(log.path)) == [{"type": "step", "step": 1, "loss": 0.5}]


def test_non_finite_values_become_null(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write("step", loss=math.nan, nested={"x": math.inf}, values=[1.0, -math.inf])
    log.flush()

    line = log.path.read_text().strip()
    assert json.loads(line) == {
        "type": "step",
        "loss": None,
        "nested": {"x": None},
        "values": [1.0, None],
    }


def test_truncate_drops_what_was_written_after_a_position(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write("epoch", epoch=1)
    position = log.position()
    log.write("step", step=99)
    log.flush()

    reopened = MetricsLog(log.path)
    reopened.truncate(position)
    reopened.write("epoch", epoch=2)
    reopened.flush()

    assert [r.get("epoch") for r in read_metrics(log.path)] == [1, 2]


def test_truncating_past_the_end_is_an_error(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")

    with pytest.raises(ConfigurationError, match="checkpoint expects at least 10"):
        log.truncate(10)


def test_reading_filters_by_type_and_skips_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "step", "step": 1}\n{"type": "epoch", "epoch": 1}\n{"type": "st')

    assert [r["type"] for r in read_metrics(path)] == ["step", "epoch"]
    assert list(read_metrics(path, "epoch")) == [{"type": "epoch", "epoch": 1}]
