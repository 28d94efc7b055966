"""``esper demo`` for real, at tiny sizes: what it grows, its numbers, and what it prints.

The graft lands at the first step boundary after the kernel has loaded (in the background), so
numbers after the germination depend on timing; the tests check those by their relations (the
kernel's parameter count, the seed states, the accuracy after equal to the last epoch's) and the
numbers before it exactly.
"""

from __future__ import annotations

import re

import pytest
import torch

from esper import cli
from esper.contracts import SeedState
from esper.tolaria.demo import DemoResult, run_demo
from esper.tolaria.demo_report import closing_line, demo_tables, epoch_line

HIDDEN = 4
BASE_PARAMETERS = 64 * HIDDEN + HIDDEN + HIDDEN * 10 + 10  # fc1 and out of a 64-4-10 MLP
KERNEL_PARAMETERS = 64 * 32 + 32 + 32 * HIDDEN + HIDDEN  # residual_mlp(hidden 32) on fc1's input


@pytest.fixture(scope="module")
def grown() -> DemoResult:
    torch.set_num_threads(1)
    # the graft blends in over one epoch; four more leave the background load ample time
    return run_demo(epochs=6, germinate_at_epoch=2, hidden=HIDDEN)


def test_the_demo_grafts_one_kernel_in_its_first_layer_and_fossilizes_it(
    grown: DemoResult,
) -> None:
    assert [record.epoch for record in grown.epochs] == [1, 2, 3, 4, 5, 6]
    assert grown.epochs[0].seeds == "dormant 4"  # 2 layers x 2 seeds, before the germination
    assert grown.epochs[-1].seeds == "dormant 3, active 1"
    assert (grown.germinated_layer, grown.germinated_at_epoch) == ("fc1", 2)
    assert re.fullmatch(r"[0-9a-f]{64}", grown.kernel_id)
    layers = {layer.layer_name: layer for layer in grown.layers}
    assert layers["fc1"].seeds_by_state[SeedState.FOSSILIZED] == 1
    assert layers["fc1"].kernel_parameters == KERNEL_PARAMETERS
    assert layers["out"].seeds_by_state[SeedState.DORMANT] == 2
    assert grown.cache is not None and (grown.cache.entries, grown.cache.misses) == (1, 1)


def test_the_demos_numbers_agree_with_each_other(grown: DemoResult) -> None:
    assert grown.parameters_before == BASE_PARAMETERS
    assert grown.parameters_after == BASE_PARAMETERS + KERNEL_PARAMETERS
    # measured when the germination starts, i.e. after epoch 1; and after fossilizing
    assert grown.accuracy_before == grown.epochs[0].test_accuracy
    assert grown.accuracy_after == grown.epochs[-1].test_accuracy  # fossilizing is exact
    assert grown.epochs[-1].train_loss < grown.epochs[0].train_loss < 2.5  # it learns
    assert 0.1 < grown.accuracy_static <= 1.0


def test_before_its_germination_the_wrapped_host_trains_exactly_like_the_static_one() -> None:
    torch.set_num_threads(1)
    two_epochs = run_demo(epochs=2, germinate_at_epoch=2, hidden=HIDDEN)
    one_epoch = run_demo(epochs=1, germinate_at_epoch=1, hidden=HIDDEN)

    # epoch 1 of the wrapped model (seeds dormant) == the static host after one epoch
    assert two_epochs.epochs[0].test_accuracy == one_epoch.accuracy_static


def test_the_report_shows_the_results_numbers(grown: DemoResult) -> None:
    seeds, cache, summary = demo_tables(grown)

    assert epoch_line(grown.epochs[0]) == (
        f"epoch   1  loss {grown.epochs[0].train_loss:.4f}  "
        f"test acc {grown.epochs[0].test_accuracy:.3f}  seeds: dormant 4"
    )
    assert seeds.rows[0] == (
        "fc1",
        "linear",
        "dormant 1, fossilized 1",
        str(KERNEL_PARAMETERS),
        grown.kernel_id[:12],
    )
    assert cache.rows[0][:4] == ("1", str(grown.cache.bytes if grown.cache else ""), "0", "1")
    assert summary.rows == (
        ("before (epoch 2)", f"{grown.accuracy_before:.4f}", str(BASE_PARAMETERS)),
        ("after", f"{grown.accuracy_after:.4f}", str(BASE_PARAMETERS + KERNEL_PARAMETERS)),
        ("static host, same run without growth", f"{grown.accuracy_static:.4f}", "310"),
    )
    assert closing_line(grown).startswith(
        'germinated {"family":"residual_mlp","params":{"activation":"relu","hidden":32}} '
        f"in layer 'fc1' (kernel {grown.kernel_id[:12]}); "
    )


def test_esper_demo_prints_each_epoch_and_the_tables(capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(1)
    expected = run_demo(epochs=2, germinate_at_epoch=2, hidden=HIDDEN)

    code = cli.main(["demo", "--epochs", "2", "--germinate-at", "2", "--hidden", str(HIDDEN)])

    out = capsys.readouterr().out
    assert code == 0
    assert epoch_line(expected.epochs[0]) in out.splitlines()  # before the graft: exact
    assert re.search(r"^epoch   2  loss \d\.\d{4}  test acc \d\.\d{3}  seeds: ", out, re.M)
    for title in ("seed states", "kernel cache", "before / after germination"):
        assert title in out
    static = re.search(r"static host, same run without growth\W+(\d\.\d{4})", out)
    assert static is not None and static.group(1) == f"{expected.accuracy_static:.4f}"
    assert "in layer 'fc1' (kernel " in out
