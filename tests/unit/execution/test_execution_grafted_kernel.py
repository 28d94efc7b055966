"""Grafted kernel: the spec travels with the weights as a uint8 buffer and decodes back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esper.contracts import BlueprintSpec, KernelTarget, LayerKind
from esper.errors import ArtifactFormatError
from esper.execution.grafted_kernel import GraftedKernel, decode_spec, encode_spec

SPEC = BlueprintSpec(family="residual_mlp", params={"hidden": 4, "norm": True})
TARGET = KernelTarget(
    layer_kind=LayerKind.LAYER_NORM, in_features=6, out_features=6, channel_dim=-1, spatial_dims=0
)


def test_spec_round_trips_through_its_buffer() -> None:
    raw = encode_spec(SPEC, TARGET)

    assert raw.dtype == torch.uint8
    assert raw.dim() == 1
    assert decode_spec(raw) == (SPEC, TARGET)
    assert torch.equal(encode_spec(SPEC, TARGET), raw)


def test_grafted_kernel_runs_its_kernel_and_keeps_its_spec_in_the_state_dict() -> None:
    kernel = nn.Linear(6, 6)
    grafted = GraftedKernel(kernel, SPEC, TARGET)
    x = torch.randn(2, 6)

    assert torch.equal(grafted(x), kernel(x))
    assert grafted.blueprint() == (SPEC, TARGET)
    assert set(grafted.state_dict()) == {"spec", "kernel.weight", "kernel.bias"}


@pytest.mark.parametrize(
    "raw", [b"not json", b'{"blueprint": {}}', b"\xff\xfe", b'{"blueprint": 1, "target": 2}']
)
def test_malformed_spec_bytes_are_a_format_error(raw: bytes) -> None:
    with pytest.raises(ArtifactFormatError, match="malformed seed spec"):
        decode_spec(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
