"""``growth.operators``: which growth operators a run may use, validated with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper.errors import ConfigurationError
from esper.tolaria.config import RunConfig, load_config

DIGITS = Path(__file__).parents[3] / "configs" / "digits.yaml"


def _operators(*overrides: str) -> object:
    return load_config(DIGITS, overrides=list(overrides)).growth.operators


def test_default_is_residual_kernels_only() -> None:
    operators = RunConfig().growth.operators
    assert operators.residual is True
    assert operators.widen == [] and operators.deepen == []
    assert not operators.grows_structure


def test_widen_sizes_load_sorted() -> None:
    operators = _operators("growth.operators.widen=[1.0,0.25,0.5]")
    assert operators.widen == [0.25, 0.5, 1.0]  # type: ignore[attr-defined]
    assert operators.grows_structure  # type: ignore[attr-defined]


@pytest.mark.parametrize("size", ["0", "-0.5", "4.5"])
def test_widen_size_out_of_range_is_named(size: str) -> None:
    with pytest.raises(ConfigurationError, match=r"growth\.operators\.widen.*in \(0, 4\]"):
        _operators(f"growth.operators.widen=[{size}]")


def test_repeated_widen_size_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="repeat a size"):
        _operators("growth.operators.widen=[0.5,0.5]")


def test_widen_init_choices() -> None:
    assert _operators("growth.operators.widen_init=gradmax").widen_init == "gradmax"  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="widen_init"):
        _operators("growth.operators.widen_init=net2net")


def test_deepen_inits() -> None:
    assert _operators("growth.operators.deepen=[fresh,copy]").deepen == ["fresh", "copy"]  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match=r"growth\.operators\.deepen"):
        _operators("growth.operators.deepen=[stack]")
    with pytest.raises(ConfigurationError, match="repeat an init"):
        _operators("growth.operators.deepen=[copy,copy]")


def test_blend_steps_must_be_non_negative() -> None:
    assert _operators("growth.operators.blend_steps=0").blend_steps == 0  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="blend_steps"):
        _operators("growth.operators.blend_steps=-1")


def test_no_operator_at_all_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigurationError, match=r"no operator is enabled.*growth\.enabled=false"):
        _operators("growth.operators.residual=false")
    assert _operators("growth.operators.residual=false", "growth.operators.widen=[0.5]")


def test_misspelt_key_names_the_closest() -> None:
    with pytest.raises(ConfigurationError, match=r"Did you mean 'growth\.operators\.widen'"):
        _operators("growth.operators.wdien=[1]")


def test_resolved_config_round_trips_through_yaml(tmp_path: Path) -> None:
    config = load_config(DIGITS, overrides=["growth.operators.widen=[0.5]"])
    saved = tmp_path / "config.yaml"
    saved.write_text(config.to_yaml())
    assert load_config(saved).growth.operators == config.growth.operators
