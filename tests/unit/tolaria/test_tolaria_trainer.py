"""The run loop: what a run leaves in its folder, and growth that is deterministic in step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from esper.errors import ConfigurationError
from esper.tolaria.checkpoint import DamagedCheckpointError
from esper.tolaria.config import load_config
from esper.tolaria.metrics import read_metrics
from esper.tolaria.progress import SilentObserver, describe_event
from esper.tolaria.resume import resume_config
from esper.tolaria.trainer import RunResult, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

GROWTH = [
    "data.name=digits",
    "host.hidden=[16]",
    "host.activation=identity",
    "seeds.per_layer=2",
    "seeds.blend_steps=5",
    "growth.start_step=10",
    "growth.decide_every=10",
    "growth.graft_delay=4",
    "growth.evaluation_steps=10",
    "growth.cooldown_steps=20",
    "growth.max_parameter_fraction=5",
    "growth.max_adaptations=3",
    "urza.worker=thread",  # ready within a second; the worker process is the smoke test's
]


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def test_a_static_run_leaves_metrics_checkpoints_and_a_report(tmp_path: Path) -> None:
    config = load_config(
        overrides=["growth.enabled=false", "train.epochs=2", f"run.dir={tmp_path}", "run.id=s"]
    )

    result = train(config, command="test")

    folder = tmp_path / "s"
    steps = list(read_metrics(folder / "metrics.jsonl", "step"))
    epochs = list(read_metrics(folder / "metrics.jsonl", "epoch"))
    info = json.loads((folder / "run.json").read_text())
    steps_per_epoch = -(-(1438 - int(1438 * 0.1)) // 64)  # digits train split minus validation
    assert result.status == "completed" and result.step == 2 * steps_per_epoch
    assert [r["step"] for r in steps] == list(range(1, 2 * steps_per_epoch + 1))
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in steps)
    assert sum(r["accuracy"] for r in steps[-5:]) > sum(r["accuracy"] for r in steps[:5])
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert epochs[-1]["test_score"] == result.test_score == info["test_score"]
    assert info["status"] == "completed" and info["command"] == "test"
    assert [p.name for p in sorted((folder / "checkpoints").iterdir())] == [
        "epoch-0001",
        "epoch-0002",
    ]
    assert (folder / "report.md").is_file()
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in (folder / "plots").glob("*.png"))
    assert len(list((folder / "plots").glob("*.png"))) == 4
    assert load_config(folder / "config.yaml") == config


class RecordingObserver(SilentObserver):
    """Keeps what the run told its observer about its setup."""

    def __init__(self) -> None:
        self.statuses: list[str] = []
        self.notices: list[tuple[str, bool]] = []

    def on_status(self, text: str) -> None:
        self.statuses.append(text)

    def on_notice(self, text: str, *, warning: bool = False) -> None:
        self.notices.append((text, warning))


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunResult, RecordingObserver]:
    """A 4-epoch run that grows (decisions every 10 steps from step 10)."""
    root = tmp_path_factory.mktemp("grown")
    torch.set_num_threads(1)
    config = load_config(overrides=[*GROWTH, "train.epochs=4", f"run.dir={root}", "run.id=g"])
    observer = RecordingObserver()
    return train(config, observer=observer), observer


def test_growth_grafts_each_kernel_exactly_graft_delay_steps_after_its_decision(
    grown: tuple[RunResult, RecordingObserver],
) -> None:
    result = grown[0]

    path = result.folder.metrics_path
    decisions = list(read_metrics(path, "decision"))
    grafts = list(read_metrics(path, "graft"))
    steps = {r["step"]: r for r in read_metrics(path, "step")}
    assert decisions, "the bottleneck policy should germinate on this linear host"
    assert [d["step"] for d in decisions][:1] == [10]
    assert {(g["layer"], g["step"]) for g in grafts} == {
        (d["layer"], d["step"] + 4) for d in decisions
    }
    for graft in grafts:  # the parameter count grows by the kernel's size at the graft step
        before, after = steps[graft["step"] - 1]["parameters"], steps[graft["step"]]["parameters"]
        assert after - before == graft["kernel_parameters"] > 0
    kept = sum(p.numel() for p in result.model.kernel_parameters())
    culled = {c["decision_id"] for c in read_metrics(path, "cull")}
    assert kept == sum(
        g["kernel_parameters"]
        for g, d in zip(grafts, decisions, strict=True)
        if d["decision_id"] not in culled
    )
    assert result.parameters == 64 * 16 + 16 + 16 * 10 + 10 + kept


def test_resuming_a_folder_that_is_not_a_run_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="is not a run folder"):
        train(load_config(overrides=[f"run.dir={tmp_path}"]), resume=tmp_path)


def test_an_existing_run_id_is_not_overwritten(tmp_path: Path) -> None:
    config = load_config(
        overrides=["growth.enabled=false", "train.epochs=1", f"run.dir={tmp_path}", "run.id=x"]
    )
    train(config)

    with pytest.raises(ConfigurationError, match="exists already; resume it"):
        train(config)


# -- what a user sees (issue 9, item 19) ----------------------------------------------------------


def test_reward_records_and_lines_name_the_seed(grown: tuple[RunResult, RecordingObserver]) -> None:
    path = grown[0].folder.metrics_path
    seeds = {d["decision_id"]: d["seed"] for d in read_metrics(path, "decision")}
    rewards = list(read_metrics(path, "reward"))

    assert rewards, "the run should have evaluated a graft"
    for reward in rewards:
        assert reward["seed"] == seeds[reward["decision_id"]]
        line = describe_event(reward)
        assert f"{reward['layer']}:{reward['seed']} " in line and "?" not in line


def test_the_warm_up_says_what_it_compiles(grown: tuple[RunResult, RecordingObserver]) -> None:
    statuses, notices = grown[1].statuses, grown[1].notices

    assert statuses[0].startswith("warm-up: compiling ") and "catalog kernels" in statuses[0]
    assert statuses[-1] == ""  # cleared when training starts
    assert any(text.startswith("warm-up: the catalog kernels were ready") for text, _ in notices)


# -- the whole config is checked before anything is created (issue 9, items 14 and 19) -------------


def _static(root: Path, *extra: str) -> list[str]:
    return ["growth.enabled=false", f"run.dir={root / 'runs'}", "run.id=s", *extra]


def test_an_unknown_policy_is_refused_before_anything_is_created(tmp_path: Path) -> None:
    config = load_config(overrides=[f"run.dir={tmp_path / 'runs'}", "growth.policy=nope"])

    with pytest.raises(ConfigurationError) as raised:
        train(config)

    message = str(raised.value)
    assert "unknown growth.policy 'nope'" in message
    assert all(name in message for name in ("bottleneck", "random", "round_robin", "pretrained"))
    assert not (tmp_path / "runs").exists()  # no run folder, no library folder


def test_a_host_that_cannot_be_built_is_refused_before_anything_is_created(
    tmp_path: Path,
) -> None:
    config = load_config(
        overrides=_static(tmp_path, "host.kind=transformer", "host.patch=7")  # 64 % 7 != 0
    )

    with pytest.raises(ConfigurationError, match="patch"):
        train(config)

    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("where", ["a file", "inside a file", "a read-only filesystem"])
def test_a_run_dir_that_cannot_hold_runs_is_one_clear_error(tmp_path: Path, where: str) -> None:
    (tmp_path / "file").write_text("x")
    run_dir = {
        "a file": tmp_path / "file",
        "inside a file": tmp_path / "file" / "runs",
        "a read-only filesystem": Path("/proc/esper-runs"),
    }[where]
    config = load_config(overrides=["growth.enabled=false", f"run.dir={run_dir}"])

    with pytest.raises(ConfigurationError, match=f"run.dir {run_dir} ") as raised:
        train(config)

    assert "\n" not in str(raised.value)


def test_a_missing_run_dir_is_created(tmp_path: Path) -> None:
    config = load_config(
        overrides=["growth.enabled=false", "train.epochs=1", f"run.dir={tmp_path / 'a' / 'b'}"]
    )

    assert train(config).status == "completed"


# -- resuming damaged and finished runs (issue 9, items 13 and 17) ---------------------------------


def _stopped_run(root: Path) -> Path:
    """A static run of 3 epochs stopped after epoch 2 (checkpoints 1 and 2)."""
    config = load_config(overrides=_static(root, "train.epochs=3"))
    assert train(config, stop_after_epoch=2).status == "interrupted"
    return root / "runs" / "s"


def _final_weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = torch.load(folder / "checkpoints" / "epoch-0003" / "tensors.pt", weights_only=True)
    return dict(tensors["model"])


def test_a_resume_past_a_damaged_checkpoint_continues_from_the_intact_one(
    tmp_path: Path,
) -> None:
    full = train(load_config(overrides=_static(tmp_path / "full", "train.epochs=3")))
    folder = _stopped_run(tmp_path)
    (folder / "checkpoints" / "epoch-0002" / "tensors.pt").write_bytes(b"")
    observer = RecordingObserver()

    result = train(resume_config(folder), resume=folder, observer=observer)

    warnings = [text for text, warning in observer.notices if warning]
    assert str(folder / "checkpoints" / "epoch-0002" / "tensors.pt") in warnings[0]
    assert warnings[-1].endswith("epoch 1")
    assert result.status == "completed" and result.epoch == 3
    assert (folder / "checkpoints" / "epoch-0002.damaged" / "tensors.pt").exists()
    expected, actual = _final_weights(full.folder.path), _final_weights(folder)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)  # still exact


def test_a_resume_from_a_chosen_epoch_sets_the_later_checkpoints_aside(tmp_path: Path) -> None:
    folder = _stopped_run(tmp_path)

    result = train(resume_config(folder), resume=folder, resume_epoch=1)

    assert result.status == "completed"
    names = sorted(p.name for p in (folder / "checkpoints").iterdir())
    assert names == ["epoch-0001", "epoch-0002", "epoch-0002.superseded", "epoch-0003"]
    info = json.loads((folder / "run.json").read_text())
    assert [r["epoch"] for r in info["resumes"]] == [1]


def test_a_resume_with_no_intact_checkpoint_is_one_error_and_changes_nothing(
    tmp_path: Path,
) -> None:
    folder = _stopped_run(tmp_path)
    for epoch in (1, 2):
        (folder / "checkpoints" / f"epoch-000{epoch}" / "state.json").write_text('{"epoch": -5}')
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    with pytest.raises(DamagedCheckpointError, match="no intact checkpoint"):
        train(resume_config(folder), resume=folder)

    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_training_a_completed_run_again_is_refused(tmp_path: Path) -> None:
    config = load_config(overrides=_static(tmp_path, "train.epochs=1"))
    folder = train(config).folder.path

    with pytest.raises(ConfigurationError, match="already complete"):
        train(resume_config(folder), resume=folder)
    extended = train(resume_config(folder, ["train.epochs=2"]), resume=folder)
    assert extended.status == "completed" and extended.epoch == 2


def test_a_resume_whose_checkpoint_does_not_fit_the_config_changes_nothing(
    tmp_path: Path,
) -> None:
    folder = _stopped_run(tmp_path)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    with pytest.raises(ConfigurationError, match="resume without overriding the data"):
        train(resume_config(folder, ["data.batch_size=32"]), resume=folder, resume_epoch=1)

    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
