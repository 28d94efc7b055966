"""Arguments of every ``esper`` command: a bad value is one line and exit 2, and parsing (help,
errors) never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from esper import cli

ROOT = Path(__file__).resolve().parents[3]

BAD_ARGUMENTS = {
    "port above 65535": (["urza", "serve", "--port", "99999"], "--port"),
    "port 0": (["urza", "serve", "--port", "0"], "--port"),
    "upload limit above its range": (
        ["urza", "serve", "--max-artifact-bytes", str(2**41)],
        "--max-artifact-bytes",
    ),
    "no ranks": (["train", "--nproc", "0"], "--nproc"),
    "negative stop epoch": (["train", "--stop-after-epoch", "-1"], "--stop-after-epoch"),
    "resume epoch 0": (["train", "--resume", "runs/x", "--epoch", "0"], "--epoch"),
    "negative demo epochs": (["demo", "--epochs", "-1"], "--epochs"),
    "demo hidden 0": (["demo", "--hidden", "0"], "--hidden"),
    "germination at epoch 0": (["demo", "--germinate-at", "0"], "--germinate-at"),
    "unknown log level": (["--log-level", "loud", "runs"], "--log-level"),
    "zero poll interval": (["tezzeret", "worker", "--poll-interval", "0"], "--poll-interval"),
    "nan lease": (["tezzeret", "worker", "--lease-seconds", "nan"], "--lease-seconds"),
    "zero max jobs": (["tezzeret", "worker", "--max-jobs", "0"], "--max-jobs"),
    "negative parent pid": (["tezzeret", "worker", "--parent-pid", "-1"], "--parent-pid"),
    "infinite cycle": (
        ["tamiyo", "serve", "--bus", "memory://", "--run-id", "r", "--cycle-ms", "inf"],
        "--cycle-ms",
    ),
    "confidence above 1": (
        ["tamiyo", "serve", "--bus", "memory://", "--run-id", "r", "--min-confidence", "2"],
        "--min-confidence",
    ),
    "negative cooldown": (
        ["tamiyo", "serve", "--bus", "memory://", "--run-id", "r", "--cooldown-steps", "-1"],
        "--cooldown-steps",
    ),
    "traversal run id": (["tamiyo", "serve", "--bus", "memory://", "--run-id", ".."], "--run-id"),
    "unknown command": (["grow"], "invalid choice"),
    "missing option": (["tamiyo", "serve", "--run-id", "r"], "--bus"),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS, ids=str)
def test_a_bad_argument_is_one_line_and_exit_2(
    case: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ESPER_URZA_TOKEN", "secret")  # `urza serve` would otherwise stop on it
    argv, option = BAD_ARGUMENTS[case]

    code = cli.main(argv)

    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and option in lines[0], lines
    assert "--help" in lines[0]


def test_the_demo_refuses_a_germination_after_its_last_epoch(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = cli.main(["demo", "--epochs", "3", "--germinate-at", "5"])

    assert code == 2 and "outside the demo's epochs 1..3" in capsys.readouterr().err


PROBE = """
import contextlib, io, json, sys
from esper.cli import main
codes = []
for argv in {argvs!r}:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            codes.append(main(argv))
        except SystemExit as exc:  # --help
            codes.append(exc.code)
print(json.dumps({{"codes": codes, "torch": "torch" in sys.modules}}))
"""


def test_help_and_argument_errors_answer_without_importing_torch() -> None:
    argvs = [
        ["--help"],
        ["train", "--help"],
        ["train", "--nproc", "0"],
        ["train", "--config", str(ROOT / "configs" / "digits.yaml"), "train.epohcs=1"],
        ["train", "--config", str(ROOT / "configs" / "nope.yaml")],
        ["kernel", "show", "0" * 64, "--run-dir", "/nonexistent/urza"],
    ]
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(argvs=argvs)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"codes": [0, 0, 2, 2, 2, 2], "torch": False}


def test_python_dash_m_esper_cli_is_the_esper_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "esper.cli", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0 and "--resume" in done.stdout and "--epoch" in done.stdout


def test_tamiyo_serve_flags_set_the_safety_config_fields_they_are_named_after() -> None:
    from esper.contracts.safety import SafetyConfig

    parser = cli.build_parser()
    base = ["tamiyo", "serve", "--bus", "memory://", "--run-id", "r"]

    defaults = SafetyConfig.from_options(vars(parser.parse_args(base)))
    flags = ["--cooldown-steps", "7", "--window-steps", "90", "--max-adaptations", "2"]
    flags += [
        "--min-confidence",
        "0.25",
        "--max-uncertainty",
        "0.5",
        "--max-parameter-fraction",
        "3",
    ]
    given = SafetyConfig.from_options(vars(parser.parse_args([*base, *flags])))

    assert defaults == SafetyConfig()
    assert given == SafetyConfig(
        cooldown_steps=7,
        window_steps=90,
        max_adaptations=2,
        min_confidence=0.25,
        max_uncertainty=0.5,
        max_parameter_fraction=3.0,
    )


def test_a_safety_flag_out_of_range_names_the_fields_range(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = cli.main(
        ["tamiyo", "serve", "--bus", "memory://", "--run-id", "r", "--window-steps", "0"]
    )

    assert code == 2
    assert "--window-steps: input should be greater than or equal to 1, got '0'" in (
        capsys.readouterr().err
    )
