"""Issue 9 item 9: every integer, float and string field of a contract is bounded.

Out-of-range values used to pass the contracts and fail later: ``in_features=10**12`` and
``init_seed=2**70`` reached PostgreSQL (a 500), a NUL in a name cannot be stored in PostgreSQL's
text columns, a huge blueprint parameter became a float. Here every scalar field of every
contract (telemetry's belong to its own tests) is probed with values past any sane bound, and
each must be refused at validation.
"""

from __future__ import annotations

import enum
import types
import typing
from typing import Any

import pydantic
import pytest

import esper.contracts as contracts
from esper.contracts import (
    AdaptationDecision,
    BlueprintRecord,
    BlueprintSpec,
    CompileJob,
    Contract,
    DecisionRefusal,
    Envelope,
    HealthSignalBatch,
    KernelAlias,
    KernelCharacterization,
    KernelFailed,
    KernelMetadata,
    KernelReady,
    KernelTarget,
    LayerTopology,
    LibraryStats,
    ModelTopology,
    RewardReport,
    TrainingProgress,
)
from esper.contracts.bounds import text_within_bounds

TARGET = {
    "layer_kind": "linear",
    "in_features": 16,
    "out_features": 8,
    "channel_dim": -1,
    "spatial_dims": 0,
}
SPEC = {"family": "residual_mlp", "params": {"hidden": 32}}
SHA = "a" * 64
JOB = "b" * 32

EXAMPLES: dict[type[Contract], dict[str, Any]] = {
    KernelTarget: TARGET,
    BlueprintSpec: SPEC,
    KernelCharacterization: {
        "device": "cpu",
        "latency_us_median": 3.5,
        "flops_per_sample": 100,
        "batch_sizes_validated": (1, 3),
        "exportable": False,
        "export_error": "no",
    },
    KernelMetadata: {
        "kernel_id": SHA,
        "blueprint": SPEC,
        "target": TARGET,
        "dtype": "float32",
        "parameter_count": 808,
        "size_bytes": 4000,
        "checksum": SHA,
        "init_seed": 0,
    },
    BlueprintRecord: {
        "blueprint_id": SHA,
        "spec": SPEC,
        "name": "wide",
        "reason": "fine",
        "created_at": 1.0,
    },
    CompileJob: {
        "job_id": JOB,
        "blueprint_id": SHA,
        "target": TARGET,
        "init_seed": 3,
        "attempts": 1,
        "worker_id": "w",
        "claimed_at": 2.0,
        "lease_expires_at": 3.0,
        "kernel_id": SHA,
        "error": "boom",
        "created_at": 1.0,
    },
    KernelAlias: {"name": "kernel-001", "kernel_id": SHA, "updated_at": 1.0},
    LibraryStats: {
        "blueprints_by_status": {"valid": 1},
        "kernels": 1,
        "kernel_bytes": 10,
        "jobs_by_status": {"queued": 2},
    },
    AdaptationDecision: {
        "run_id": "run",
        "step": 5,
        "action": "germinate",
        "layer_name": "fc1",
        "seed_idx": 0,
        "blueprint": SPEC,
        "policy": "heuristic",
        "confidence": 0.5,
        "uncertainty": 0.1,
        "reason": "why",
        "created_at": 1.0,
    },
    DecisionRefusal: {
        "run_id": "run",
        "decision_id": JOB,
        "step": 5,
        "layer_name": "fc1",
        "action": "germinate",
        "gate": "budget",
        "reason": "too big",
        "policy": "heuristic",
        "created_at": 1.0,
    },
    RewardReport: {
        "run_id": "run",
        "decision_id": JOB,
        "layer_name": "fc1",
        "step": 5,
        "components": {"loss": 0.1},
        "weights": {"loss": 1.0},
        "total": 0.1,
    },
    Envelope: {
        "topic": "kernel.ready",
        "sender": "tezzeret",
        "timestamp": 1.0,
        "trace_id": "t",
        "payload_type": "KernelReady",
        "payload": {},
    },
    HealthSignalBatch: {"run_id": "run", "step": 1, "signals": ()},
    KernelReady: {"kernel_id": SHA, "blueprint_id": SHA, "target": TARGET, "job_id": JOB},
    KernelFailed: {
        "job_id": JOB,
        "blueprint_id": SHA,
        "target": TARGET,
        "init_seed": 0,
        "error": "refused",
    },
    LayerTopology: {"layer_name": "fc1", "target": TARGET, "base_parameters": 10, "num_seeds": 2},
    ModelTopology: {
        "run_id": "run",
        "layers": (),
        "edges": ((0, 1),),
        "base_parameters": 100,
    },
    TrainingProgress: {
        "run_id": "run",
        "step": 3,
        "total_steps": 10,
        "loss": 0.5,
        "base_parameters": 10,
        "kernel_parameters": 0,
    },
}

UNBOUNDED_FLOATS = {
    # a measurement: a diverged run's mean loss is NaN or inf, which the controller ignores
    (TrainingProgress, "loss"): ("nan", "inf"),
}
"""Float fields that may legitimately hold the listed non-finite values."""


def _contract_classes() -> set[type[Contract]]:
    found = set()
    for name in contracts.__all__:
        value = getattr(contracts, name)
        if (
            isinstance(value, type)
            and issubclass(value, Contract)
            and value is not Contract
            and value.__module__ != "esper.contracts.telemetry"
        ):
            found.add(value)
    return found


def _scalar_kind(annotation: Any) -> type | None:
    """``int``, ``float`` or ``str`` when the field holds one of those (or ``None`` of it)."""
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    options = [a for a in args if a is not type(None)] if args else [annotation]
    if len(options) != 1:
        return None
    (option,) = options
    if isinstance(option, type) and issubclass(option, enum.Enum):
        return None
    return option if option in (int, float, str) else None


def _probes(kind: type) -> list[Any]:
    if kind is int:
        return [2**70, -(2**70)]
    if kind is float:
        return [float("nan"), float("inf"), -float("inf")]
    return ["x" * 1_000_000, "a\x00b"]


def _cases() -> list[tuple[type[Contract], str, Any]]:
    cases = []
    for cls in sorted(EXAMPLES, key=lambda c: c.__name__):
        for field, info in cls.model_fields.items():
            kind = _scalar_kind(info.annotation)
            if kind is None or field == "schema_version":
                continue
            for probe in _probes(kind):
                allowed = UNBOUNDED_FLOATS.get((cls, field), ())
                if kind is float and str(abs(probe)) in allowed:
                    continue
                cases.append((cls, field, probe))
    return cases


def test_every_contract_has_an_example_here() -> None:
    assert _contract_classes() == set(EXAMPLES)
    for cls, example in EXAMPLES.items():
        cls.model_validate(example)  # the examples are valid


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    _cases(),
    ids=lambda v: v.__name__ if isinstance(v, type) else repr(v)[:12],
)
def test_out_of_range_scalar_fields_are_refused(
    cls: type[Contract], field: str, value: Any
) -> None:
    with pytest.raises(pydantic.ValidationError):
        cls.model_validate({**EXAMPLES[cls], field: value})


@pytest.mark.parametrize(
    "params",
    [
        {"hidden": 2**60},
        {"hidden": -(2**60)},
        {"scale": float("nan")},
        {"scale": float("inf")},
        {"activation": "x" * 201},
        {"activation": "re\x00lu"},
        {"bad name": 1},
        {f"p{i}": i for i in range(33)},
    ],
    ids=["huge_int", "huge_negative", "nan", "inf", "long_str", "nul", "bad_key", "too_many"],
)
def test_blueprint_params_are_bounded(params: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        BlueprintSpec(family="residual_mlp", params=params)


def test_bounded_params_keep_their_types_and_ids() -> None:
    spec = BlueprintSpec(
        family="lowrank_adapter", params={"rank": 4, "bias": True, "scale": 2.0, "act": "relu"}
    )
    assert [type(v) for v in spec.params.values()] == [int, bool, float, str]
    assert spec.params["rank"] == 4 and spec.params["scale"] == 2.0
    # The canonical JSON (and so every stored blueprint id) is what it was before the bounds.
    assert (
        spec.canonical_json()
        == '{"family":"lowrank_adapter","params":{"act":"relu","bias":true,"rank":4,"scale":2.0}}'
    )
    assert BlueprintSpec(family="lowrank_adapter", params={"rank": 2**53}).params["rank"] == 2**53


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (HealthSignalBatch, "signals", ()),
        (ModelTopology, "edges", ((0, 100_000),)),
        (KernelCharacterization, "batch_sizes_validated", tuple(range(1, 34))),
        (RewardReport, "components", {f"c{i}": 0.0 for i in range(65)}),
    ],
    ids=["batch_ok", "edge_index", "batch_sizes", "components"],
)
def test_containers_are_bounded(cls: type[Contract], field: str, value: Any) -> None:
    if value == ():
        cls.model_validate({**EXAMPLES[cls], field: value})  # an empty batch is fine
        return
    with pytest.raises(pydantic.ValidationError):
        cls.model_validate({**EXAMPLES[cls], field: value})


def test_text_within_bounds_makes_any_text_storable() -> None:
    long = "boom\x00" + "y" * 50_000
    cut = text_within_bounds(long)
    CompileJob.model_validate({**EXAMPLES[CompileJob], "error": cut})
    assert cut.startswith("boom\\x00yyy") and "more characters cut" in cut
    assert len(cut) <= 20_000
    assert text_within_bounds("short") == "short"
