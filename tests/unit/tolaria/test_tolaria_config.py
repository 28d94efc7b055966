"""Run configs: presets, key=value overrides, and errors that name the bad key and the valid ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from esper.errors import ConfigurationError
from esper.tolaria.config import (
    CnnHost,
    Mnist1dData,
    RunConfig,
    load_config,
    parse_overrides,
)

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
PRESETS = sorted(CONFIGS.glob("*.yaml"))


def test_the_three_dataset_presets_exist() -> None:
    names = {path.stem for path in PRESETS}

    assert {"digits", "mnist1d", "regression"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_each_preset_validates_and_opens_with_its_run_command(path: Path) -> None:
    first_line = path.read_text().splitlines()[0]

    config = load_config(path)

    assert first_line == f"# esper train --config configs/{path.name}"
    assert isinstance(config, RunConfig)
    assert config.growth.enabled


def test_overrides_are_parsed_as_yaml_and_nested() -> None:
    tree = parse_overrides(["train.epochs=2", "host.hidden=[16, 8]", "growth.enabled=false"])

    assert tree == {
        "train": {"epochs": 2},
        "host": {"hidden": [16, 8]},
        "growth": {"enabled": False},
    }


def test_overrides_replace_preset_values(tmp_path: Path) -> None:
    config = load_config(
        CONFIGS / "digits.yaml",
        overrides=["train.epochs=2", f"run.dir={tmp_path}", "train.lr=3e-3", "host.hidden=[4]"],
    )

    assert config.train.epochs == 2
    assert config.run.dir == tmp_path
    assert config.train.lr == pytest.approx(0.003)
    assert config.host.hidden == [4]  # type: ignore[union-attr]
    assert config.data.name == "digits"  # untouched keys keep the preset's values


def test_switching_a_tagged_section_uses_that_variants_fields() -> None:
    config = load_config(overrides=["data.name=mnist1d", "host.kind=cnn", "host.channels=[4]"])

    assert isinstance(config.data, Mnist1dData)
    assert isinstance(config.host, CnnHost)
    assert config.host.channels == [4]


def test_an_unknown_key_is_named_with_a_suggestion_and_the_valid_keys() -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_config(overrides=["train.epoch=2"])

    message = str(caught.value)
    assert "unknown key 'train.epoch'" in message
    assert "Did you mean 'train.epochs'?" in message
    assert "epochs, optimizer, lr" in message


def test_an_unknown_section_lists_the_sections() -> None:
    with pytest.raises(
        ConfigurationError, match=r"unknown key 'trian'.*Did you mean 'train'"
    ) as caught:
        load_config(overrides=["trian.epochs=2"])

    assert "run, data, host, seeds, train, growth, urza" in str(caught.value)


def test_a_key_of_another_variant_is_rejected_with_this_variants_keys() -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_config(overrides=["host.kind=cnn", "host.hidden=[3]"])

    message = str(caught.value)
    assert "unknown key 'host.hidden'" in message
    assert "kind, channels, kernel_size, activation" in message


def test_a_bad_value_names_the_key_and_the_constraint() -> None:
    with pytest.raises(ConfigurationError, match=r"train\.lr: Input should be greater than 0"):
        load_config(overrides=["train.lr=-1"])


def test_an_unknown_dataset_lists_the_embedded_ones() -> None:
    with pytest.raises(ConfigurationError, match="'digits', 'mnist1d', 'regression'"):
        load_config(overrides=["data.name=cifar"])


def test_a_malformed_override_says_how_to_write_one() -> None:
    with pytest.raises(ConfigurationError, match="not key=value"):
        load_config(overrides=["epochs"])


def test_a_missing_file_points_at_the_presets(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"configs/digits\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_the_resolved_config_round_trips_through_yaml(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "mnist1d.yaml", overrides=["train.epochs=3"])
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())

    assert load_config(path) == config


# -- bad files and bounded input (issue 9, items 14, 15 and 19) ----------------------------------


def _alias_bomb(levels: int, width: int) -> str:
    """A "billion laughs" document: ``width ** levels`` values from a few hundred bytes."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    return "run:\n  name: bomb\nbomb:\n" + "\n".join("  " + line for line in lines) + "\n"


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    bomb = _alias_bomb(levels=6, width=6)  # 46656 values from 300 bytes
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb)

    with pytest.raises(ConfigurationError, match="more than 10000 values") as raised:
        load_config(path)

    assert len(bomb) < 400 and len(str(raised.value)) < 400


def test_an_alias_bomb_in_an_override_is_refused() -> None:
    value = "[" + ", ".join(["&a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"] + ["*a"] * 9) + "]"
    nested = "[" + ", ".join([f"&b {value}"] + ["*b"] * 100) + "]"

    with pytest.raises(ConfigurationError, match="more than 10000 values"):
        load_config(overrides=[f"host.hidden={nested}"])


def test_a_recursive_alias_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text("host: &h\n  kind: mlp\n  hidden: [*h]\n")

    with pytest.raises(ConfigurationError, match="recursive alias"):
        load_config(path)


def test_a_config_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("run:\n  name: big\n" + "# padding\n" * 10_000)

    with pytest.raises(ConfigurationError, match="larger than 64 KiB"):
        load_config(path)


def test_a_folder_or_a_non_utf8_file_is_a_one_line_error(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))

    with pytest.raises(ConfigurationError, match="is a folder, not a file"):
        load_config(tmp_path)
    with pytest.raises(ConfigurationError, match="not UTF-8 text") as raised:
        load_config(latin1)
    assert "\n" not in str(raised.value)


def test_errors_quote_a_huge_input_only_in_part() -> None:
    huge = "x" * 1_000_000

    for override in (f"run.name={huge}", f"host.activation={huge}", f"data.name={huge}"):
        with pytest.raises(ConfigurationError) as raised:
            load_config(overrides=[override])
        assert len(str(raised.value)) < 1000, override


@pytest.mark.parametrize("run_id", ["..", ".", ".hidden", "-x", "a/b", "a" * 101, "a\nb"])
def test_a_run_id_must_be_a_plain_folder_name(run_id: str) -> None:
    with pytest.raises(ConfigurationError, match=r"run\.id: .*a folder name"):
        load_config(overrides=[f"run.id={run_id!r}" if "\n" in run_id else f"run.id={run_id}"])


def test_a_missing_config_names_the_closest_preset_and_all_of_them() -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_config(CONFIGS / "digitz.yaml")

    message = str(raised.value)
    assert f"did you mean {CONFIGS / 'digits.yaml'}?" in message
    assert all(str(preset) in message for preset in PRESETS), message


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_a_preset_comment_names_the_compile_worker_the_run_uses(path: Path) -> None:
    header = " ".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    worker = load_config(path).urza.worker

    if "Tezzeret" in header:
        assert {"process": "worker process", "thread": "Tezzeret thread"}[worker] in header


def test_the_safety_keys_have_the_safety_configs_names_and_ranges() -> None:
    from esper.contracts.safety import SafetyConfig

    growth = RunConfig().growth
    safety_keys = {"max_adaptations", "cooldown_steps", "max_parameter_fraction"}
    safety_keys |= {"min_confidence", "loss_spike_tolerance"}

    assert safety_keys <= set(type(growth).model_fields) & set(SafetyConfig.model_fields)
    for key in safety_keys:  # one range, stated once: the same constraints on both
        assert type(growth).model_fields[key].metadata == SafetyConfig.model_fields[key].metadata, (
            key
        )


@pytest.mark.parametrize(
    ("old", "new", "value", "loaded"),
    [
        ("max_seeds", "max_adaptations", "2", 2),
        ("max_parameter_ratio", "max_parameter_fraction", "3.0", 3.0),
        ("loss_spike_ratio", "loss_spike_tolerance", "1.5", 0.5),
    ],
)
def test_an_old_key_still_loads_under_its_new_name_with_a_warning(
    old: str,
    new: str,
    value: str,
    loaded: float,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "old.yaml"
    path.write_text(f"growth:\n  {old}: {value}\n")

    with caplog.at_level("WARNING", logger="esper.tolaria.config_renames"):
        from_file = load_config(path)
        from_override = load_config(overrides=[f"growth.{old}={value}"])

    assert getattr(from_file.growth, new) == loaded
    assert getattr(from_override.growth, new) == loaded
    assert f"growth.{old} is now growth.{new}" in caplog.text
    assert old not in from_file.to_yaml()  # a run folder keeps the new name


def test_an_old_key_in_an_override_replaces_the_new_key_of_the_file() -> None:
    config = load_config(CONFIGS / "digits.yaml", overrides=["growth.max_seeds=1"])

    assert config.growth.max_adaptations == 1


def test_a_key_under_both_names_is_refused_naming_the_one_to_keep(tmp_path: Path) -> None:
    path = tmp_path / "both.yaml"
    path.write_text("growth:\n  max_seeds: 2\n  max_adaptations: 3\n")

    with pytest.raises(ConfigurationError, match=r"keep only growth\.max_adaptations"):
        load_config(path)


def test_an_old_loss_spike_ratio_that_is_not_a_number_says_what_to_write() -> None:
    with pytest.raises(ConfigurationError, match=r"growth.loss_spike_tolerance: 0\.5"):
        load_config(overrides=["growth.loss_spike_ratio=high"])


def test_a_run_folder_config_of_the_old_names_resumes_with_the_same_values(
    tmp_path: Path,
) -> None:
    old = RunConfig().model_dump(mode="json")
    growth = old["growth"]
    growth["max_seeds"] = growth.pop("max_adaptations")
    growth["max_parameter_ratio"] = growth.pop("max_parameter_fraction")
    growth["loss_spike_ratio"] = growth.pop("loss_spike_tolerance") + 1.0
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))

    assert load_config(path) == RunConfig()


ASSIGNED_VALUES = {
    "2": 2,
    "0.5": 0.5,
    "1e-3": 0.001,  # YAML 1.1 alone would keep this a string
    "-2E4": -20000.0,
    "true": True,
    "[16, 16]": [16, 16],
    "relu": "relu",
    "'1e5'": "1e5",  # quoted: text
    "": "",
}


@pytest.mark.parametrize("raw", ASSIGNED_VALUES, ids=repr)
def test_overrides_and_blueprint_parameters_read_a_value_the_same_way(raw: str) -> None:
    from esper.tolaria.assignments import parse_assignment

    override = parse_overrides([f"section.key={raw}"])["section"]["key"]
    _, parameter = parse_assignment(f"key={raw}", what="--param", example="--param rank=8")

    assert override == parameter == ASSIGNED_VALUES[raw]
    assert type(override) is type(ASSIGNED_VALUES[raw])


def test_a_config_file_reads_exponent_numbers_as_numbers(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  lr: 3e-3\n  kernel_lr: 1E-4\nhost:\n  hidden: [1e2]\n")

    config = load_config(path)

    assert config.train.lr == 0.003 and config.train.kernel_lr == 0.0001
    assert config.host.hidden == [100]  # type: ignore[union-attr]


def test_an_override_key_with_an_empty_part_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="empty part in its key"):
        parse_overrides(["train..epochs=2"])
