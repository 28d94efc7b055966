"""The step path of ``esper train`` never reads a tensor on the host outside the allowed points
(issue 13, goal 5): on an accelerator such a read waits for the device every step."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from esper.tolaria.config import load_config
from esper.tolaria.progress import SilentObserver
from esper.tolaria.trainer import train

READS = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy")


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """A one-element list: how many times Esper's own code has read a tensor on the host."""
    count = [0]
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: Any, _original: Any = original) -> Any:
            if sys._getframe(1).f_globals.get("__name__", "").startswith("esper"):
                count[0] += 1
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    yield count


class ReadsPerStep(SilentObserver):
    """Records the host-read count as each step ends, and the loss each step was shown with."""

    def __init__(self, count: list[int]) -> None:
        self.count = count
        self.at_step: dict[int, int] = {}
        self.losses: dict[int, float | None] = {}

    def on_step(self, *, step: int, loss: float | None, seeds: Mapping[str, int]) -> None:
        self.at_step[step] = self.count[0]
        self.losses[step] = loss


def test_a_static_run_reads_the_device_only_on_logged_steps(
    tmp_path: Path, host_reads: list[int]
) -> None:
    torch.set_num_threads(1)
    config = load_config(
        overrides=[
            "growth.enabled=false",
            "train.epochs=1",
            "train.log_every=5",
            f"run.dir={tmp_path}",
            "run.id=s",
        ]
    )
    observer = ReadsPerStep(host_reads)

    train(config, observer=observer, command="test")

    steps = sorted(observer.at_step)
    assert len(steps) > 10
    reads = {s: observer.at_step[s] - observer.at_step[s - 1] for s in steps[1:]}
    assert {s: n for s, n in reads.items() if s % 5 != 0} == dict.fromkeys(
        (s for s in steps[1:] if s % 5 != 0), 0
    )
    assert all(n == 1 for s, n in reads.items() if s % 5 == 0)  # loss and accuracy: one transfer
    assert all((observer.losses[s] is None) == (s % 5 != 0) for s in steps)
