"""The ``esper`` command line: library commands work and bad input gives a clear error (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper import cli
from servers import free_port


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())  # undo rich's line wrapping


def test_blueprint_submit_and_list_on_the_embedded_library(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    where = ["--run-dir", str(tmp_path)]
    code, out = _run(
        capsys, "blueprint", "submit", *where, "--family", "lowrank_adapter", "--param", "rank=4"
    )
    assert code == 0 and "submitted" in out and '"rank":4' in out
    code, out = _run(capsys, "blueprint", "list", *where)
    assert code == 0 and "blueprints (1)" in out and "lowrank_adapter" in out


def _library(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """An embedded library in ``tmp_path`` (one blueprint submitted); its options."""
    where = ["--run-dir", str(tmp_path)]
    code, _ = _run(capsys, "blueprint", "submit", *where, "--family", "lowrank_adapter")
    assert code == 0
    return where


def test_unknown_kernel_id_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    where = _library(tmp_path, capsys)
    code, out = _run(capsys, "kernel", "show", "0" * 64, *where)
    assert code == 2 and "no such kernel" in out


def test_traversal_style_id_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    where = _library(tmp_path, capsys)
    code, out = _run(capsys, "kernel", "show", "../../etc/passwd", *where)
    assert code == 2 and "sha256" in out


@pytest.mark.parametrize(
    "command", [["kernel", "show", "0" * 64], ["kernel", "list"], ["blueprint", "list"]]
)
def test_reading_commands_never_create_a_library(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    missing = tmp_path / "urza"

    code, out = _run(capsys, *command, "--run-dir", str(missing))

    assert code == 2 and f"there is no Urza library at {missing}" in out
    assert not missing.exists()


def test_unknown_blueprint_family_names_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _run(capsys, "blueprint", "submit", "--run-dir", str(tmp_path), "--family", "nope")
    assert code == 2 and "unknown blueprint family 'nope'" in out and "residual_mlp" in out


def test_unreachable_service_names_the_url(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out = _run(capsys, "kernel", "list", "--urza", url)
    assert code == 2 and "could not reach the Urza service" in out and url in out


def test_serving_without_a_token_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("ESPER_URZA_TOKEN", raising=False)
    code, out = _run(capsys, "urza", "serve", "--port", str(free_port()))
    assert code == 2 and "ESPER_URZA_TOKEN" in out


def test_a_bad_config_key_names_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    configs = Path(__file__).resolve().parents[2] / "configs"
    code, out = _run(capsys, "train", "--config", str(configs / "digits.yaml"), "train.epohcs=2")
    assert code == 2 and "epohcs" in out and "epochs" in out


def test_blueprint_parameters_are_read_like_config_overrides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    where = ["--run-dir", str(tmp_path)]
    params = ["--param", "rank=4", "--param", "bias=true", "--param", "activation=relu"]

    code, out = _run(capsys, "blueprint", "submit", *where, "--family", "lowrank_adapter", *params)

    assert code == 0 and '"activation":"relu","bias":true,"rank":4' in out


def test_a_blueprint_parameter_without_a_value_says_how_to_write_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    where = ["--run-dir", str(tmp_path)]

    code, out = _run(
        capsys, "blueprint", "submit", *where, "--family", "lowrank_adapter", "--param", "rank"
    )

    assert code == 2 and "--param 'rank' is not key=value; write e.g. --param rank=8" in out
