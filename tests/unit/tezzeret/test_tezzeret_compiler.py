"""Tezzeret compiler: determinism, validation failures with reasons, characterization."""

from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from esper.blueprints import decode_artifact, register_family, sha256_hex
from esper.contracts import BlueprintSpec, KernelTarget
from esper.tezzeret import BlueprintValidationError, compile_blueprint, example_input
from factories import conv2d_target, linear_target

LINEAR = linear_target(12, 6)
CONV = conv2d_target(4, 4)


class _NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Broken(nn.Module):
    def __init__(self, out_features: int, mode: str) -> None:
        super().__init__()
        self.proj = nn.Linear(out_features, out_features)
        self.out_features = out_features
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.new_zeros(x.shape[0], self.out_features)
        if self.mode == "nonzero":
            return y + 1.0
        if self.mode == "nan":
            return y * float("nan")
        if self.mode == "shape":
            return y[:, :-1]
        return y + self.proj(y) * 0.0  # "ok"


class _BrokenFamily:
    """Test-only families whose kernels violate one validation rule each."""

    params_model = _NoParams

    def __init__(self, mode: str) -> None:
        self.name = f"tezzeret_test_{mode}"
        self.mode = mode

    def incompatibility(self, params: BaseModel, target: KernelTarget) -> str | None:
        return None

    def build(self, params: BaseModel, target: KernelTarget) -> nn.Module:
        return _Broken(target.out_features, self.mode)


for _mode in ("nonzero", "nan", "shape"):
    register_family(_BrokenFamily(_mode))


@pytest.mark.parametrize(
    ("spec", "target"),
    [
        (BlueprintSpec(family="lowrank_adapter", params={"rank": 3}), LINEAR),
        (BlueprintSpec(family="residual_mlp", params={"hidden": 16, "norm": True}), LINEAR),
        (BlueprintSpec(family="conv_adapter", params={"mode": "depthwise"}), CONV),
        (BlueprintSpec(family="conv_adapter", params={"mode": "pointwise", "hidden": 8}), CONV),
    ],
)
def test_compile_is_deterministic_and_characterized(
    spec: BlueprintSpec, target: KernelTarget
) -> None:
    first = compile_blueprint(spec, target, init_seed=7, latency_trials=3)
    second = compile_blueprint(spec, target, init_seed=7, latency_trials=3)
    other_seed = compile_blueprint(spec, target, init_seed=8, latency_trials=3)

    assert first.artifact == second.artifact
    assert first.kernel_id == sha256_hex(first.artifact) == second.kernel_id
    assert other_seed.kernel_id != first.kernel_id

    meta = first.metadata
    module = decode_artifact(first.artifact, first.kernel_id).module
    assert meta.parameter_count == sum(p.numel() for p in module.parameters())
    assert meta.size_bytes == len(first.artifact)
    assert meta.blueprint == spec and meta.target == target and meta.init_seed == 7
    char = meta.characterization
    assert char is not None
    assert char.exportable and char.export_error is None
    assert char.latency_us_median > 0
    assert char.flops_per_sample > 0
    assert char.batch_sizes_validated == (1, 3, 32)
    # the compiled kernel is function-preserving on any input of the target's layout
    assert torch.equal(
        module(example_input(target, 5)),
        torch.zeros(5, *module(example_input(target, 5)).shape[1:]),
    )


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("nonzero", "must output exactly zero"),
        ("nan", "non-finite values"),
        ("shape", "expected (1, 6)"),
    ],
)
def test_validation_failures_name_the_check(mode: str, reason: str) -> None:
    spec = BlueprintSpec(family=f"tezzeret_test_{mode}")
    with pytest.raises(BlueprintValidationError) as caught:
        compile_blueprint(spec, LINEAR, latency_trials=1)
    assert reason in caught.value.reason
    assert spec.family in str(caught.value)


def test_incompatible_target_is_a_validation_error() -> None:
    with pytest.raises(BlueprintValidationError, match="channels-first"):
        compile_blueprint(BlueprintSpec(family="conv_adapter"), LINEAR)


def test_unknown_family_is_a_validation_error() -> None:
    with pytest.raises(BlueprintValidationError, match="unknown blueprint family"):
        compile_blueprint(BlueprintSpec(family="no_such_family"), LINEAR)
