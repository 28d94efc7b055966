"""``esper train`` and ``esper runs`` with bad input: one line and exit 2, nothing created; a
completed run resumed says so and changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from esper import cli
from esper.cli.run_commands import runs_table
from esper.tolaria.config import load_config
from esper.tolaria.run_folder import list_runs
from esper.tolaria.trainer import train

DIGITS = str(Path(__file__).resolve().parents[3] / "configs" / "digits.yaml")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_a_config_folder_or_a_non_utf8_config_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00run: {}")

    code, _, err = _run(capsys, "train", "--config", str(tmp_path))
    assert code == 2 and "is a folder" in _one_error_line(err)
    code, _, err = _run(capsys, "train", "--config", str(binary))
    assert code == 2 and "not UTF-8" in _one_error_line(err)


def test_an_alias_bomb_config_is_refused_in_one_short_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    levels = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("run:\n" + "".join(f"  {line}\n" for line in levels))

    code, out, err = _run(capsys, "train", "--config", str(bomb))

    assert code == 2 and "more than 10000 values" in _one_error_line(err)
    assert len(out) + len(err) < 500


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("run.id=..", "a folder name"),
        ("run.dir={file}", "is a file"),
        ("run.dir={file}/runs", "is a file"),
        ("growth.policy=nope", "pretrained"),
    ],
)
def test_a_bad_run_setting_is_one_line_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, problem: str
) -> None:
    (tmp_path / "file").write_text("not a folder")
    runs = tmp_path / "runs"
    extra = [] if "run.dir" in override else [f"run.dir={runs}"]
    argv = ["train", "--config", DIGITS, *extra, override.format(file=tmp_path / "file")]

    code, _, err = _run(capsys, *argv)

    assert code == 2 and problem in _one_error_line(err.replace("\n  ", " ")), err
    assert not runs.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_resume_and_epoch_must_go_together(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "train", "--config", DIGITS, "--epoch", "2")

    assert code == 2 and "--epoch picks the checkpoint of --resume" in _one_error_line(err)


@pytest.fixture(scope="module")
def completed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("completed")
    config = load_config(
        overrides=["growth.enabled=false", "train.epochs=1", f"run.dir={root}", "run.id=done"]
    )
    return train(config, command="esper train --config digits.yaml").folder.path


def test_resuming_a_completed_run_says_so_and_changes_nothing(
    completed_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before_paths = list(completed_run.rglob("*"))
    files = [p for p in before_paths if p.is_file()]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}

    code, out, err = _run(capsys, "train", "--resume", str(completed_run))

    assert code == 0 and err == ""
    assert "run done is already complete (epoch 1 of 1, test accuracy " in out
    assert "nothing was changed" in out and "train.epochs=" in out
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before
    assert sorted(completed_run.rglob("*")) == sorted(before_paths)
    report = (completed_run / "report.md").read_text()
    assert "esper train --config digits.yaml" in report and "--resume" not in report


def test_resuming_from_an_epoch_without_a_checkpoint_names_the_ones_there(
    completed_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(capsys, "train", "--resume", str(completed_run), "--epoch", "7")

    assert code == 2 and "no checkpoint of epoch 7 (checkpoints: 1)" in _one_error_line(err)


# -- esper runs ------------------------------------------------------------------------------


def _fake_run(root: Path, run_id: str, info: object) -> Path:
    folder = root / run_id
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("{}\n")
    (folder / "run.json").write_text(info if isinstance(info, str) else json.dumps(info))
    return folder


def _info(**fields: object) -> dict[str, object]:
    return {
        "status": "completed",
        "dataset": "mnist1d",
        "host": "transformer",
        "epoch": 30,
        "epochs": 30,
        "test_score": 0.98542,
        "score_name": "accuracy",
        "parameters": 123456,
        "seeds": "2 dormant, 3 fossilized, 1 blending",
        "started_at": "2026-01-01T00:00:00",
        **fields,
    }


def test_esper_runs_is_readable_at_80_columns(tmp_path: Path) -> None:
    ids = ["digits-transformer-20260101-000000-abcd", "mnist1d-cnn-20260102-101010-0f0f"]
    _fake_run(tmp_path, ids[0], _info())
    _fake_run(tmp_path, ids[1], _info(status="interrupted", score_name="r2", test_score=-0.5))
    console = Console(width=80, record=True, color_system=None)

    console.print(runs_table(list_runs(tmp_path), title="runs"))

    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    for run_id, status, score in zip(
        ids, ["completed", "interrupted"], ["0.985 acc", "-0.500 R²"], strict=True
    ):
        (row,) = [line for line in lines if run_id in line]  # never broken across lines
        assert status in row and score in row and "30/30" in row
    assert text.count("mnist1d transformer, 123456 params") == 2


def test_esper_runs_lists_the_readable_runs_and_names_a_damaged_run_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_run(tmp_path, "good", _info())
    damaged = {
        "not-json": "{oops",
        "a-list": "[1, 2]",
        "bad-epoch": json.dumps(_info(epoch="many")),
    }
    for run_id, text in damaged.items():
        _fake_run(tmp_path, run_id, text)

    code, out, err = _run(capsys, "runs", "--dir", str(tmp_path))

    assert code == 2
    assert "good" in out and "completed" in out
    warnings = err.strip().splitlines()
    assert len(warnings) == 3 and all(w.startswith("warning: ") for w in warnings)
    for run_id in damaged:
        assert any(str(tmp_path / run_id / "run.json") in w for w in warnings), run_id


def test_esper_runs_on_a_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "runs").write_text("x")

    code, _, err = _run(capsys, "runs", "--dir", str(tmp_path / "runs"))

    assert code == 2 and "is a file, not a folder of runs" in _one_error_line(err)
