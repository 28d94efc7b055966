"""End to end: ``esper train`` on the digits preset with widen enabled and the width-bottleneck
heuristic grows a layer, keeps it, and finishes with a plain wider model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import esper
from esper.tolaria.config import load_config
from esper.tolaria.metrics import read_metrics
from esper.tolaria.progress import SilentObserver
from esper.tolaria.trainer import train

WIDEN_RUN = [
    "data.name=digits",
    "host.hidden=[16]",
    "growth.policy=width_bottleneck",
    "growth.operators.widen=[0.5]",
    "growth.operators.residual=false",
    "growth.operators.blend_steps=3",
    "growth.precompile=false",
    "growth.warm_start=false",
    "growth.start_step=4",
    "growth.decide_every=4",
    "growth.evaluation_steps=4",
    "growth.max_adaptations=1",
    "growth.max_parameter_fraction=10",
    "growth.loss_spike_tolerance=10",
    "urza.worker=thread",
    "train.epochs=1",
    "train.checkpoint=false",
]


def test_digits_run_widens_a_layer_and_ends_plain_and_wider(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    config = load_config(overrides=[*WIDEN_RUN, f"run.dir={tmp_path}", "run.id=w"])
    result = train(config, observer=SilentObserver())
    assert result.status == "completed"
    decisions = list(read_metrics(result.folder.metrics_path, "decision"))
    assert decisions and decisions[0]["operator"] == "widen"  # type: ignore[index]
    plain = esper.unwrap(result.model)
    widths = [m.out_features for m in plain.modules() if isinstance(m, nn.Linear)]
    assert widths == [24, 10]  # 16 hidden units + 50 %
    assert not any(type(m).__module__.startswith("esper") for m in plain.modules())


def test_widen_in_a_run_that_does_not_allow_it_is_not_offered(tmp_path: Path) -> None:
    overrides = [o for o in WIDEN_RUN if not o.startswith("growth.operators")]
    config = load_config(overrides=[*overrides, f"run.dir={tmp_path}", "run.id=n"])
    result = train(config, observer=SilentObserver())
    decisions = list(read_metrics(result.folder.metrics_path, "decision"))
    assert all(d.get("operator", "residual") == "residual" for d in decisions)  # type: ignore[union-attr]


@pytest.mark.parametrize("size", [0.25, 1.0])
def test_widen_size_setting_sets_the_new_width(tmp_path: Path, size: float) -> None:
    overrides = [o for o in WIDEN_RUN if not o.startswith("growth.operators.widen=")]
    config = load_config(
        overrides=[
            *overrides,
            f"growth.operators.widen=[{size}]",
            f"run.dir={tmp_path}",
            "run.id=s",
        ]
    )
    config.growth.policy = "width_bottleneck"
    result = train(config, observer=SilentObserver())
    plain = esper.unwrap(result.model)
    first = next(m for m in plain.modules() if isinstance(m, nn.Linear))
    assert first.out_features == 16 + round(16 * size)
