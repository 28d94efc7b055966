"""Building kernels never touches the global RNG (safe on background threads)."""

from __future__ import annotations

import threading

import torch

from esper.blueprints import build_kernel, create_artifact
from esper.contracts import BlueprintSpec, KernelTarget, LayerKind
from esper.tezzeret import compile_blueprint

LINEAR = KernelTarget(
    layer_kind=LayerKind.LINEAR, in_features=12, out_features=6, channel_dim=-1, spatial_dims=0
)
CONV = KernelTarget(
    layer_kind=LayerKind.CONV2D, in_features=4, out_features=4, channel_dim=1, spatial_dims=2
)
SPECS = [
    (BlueprintSpec(family="lowrank_adapter", params={"rank": 3, "bias": True}), LINEAR),
    (BlueprintSpec(family="residual_mlp", params={"hidden": 16, "norm": True}), LINEAR),
    (BlueprintSpec(family="conv_adapter", params={"mode": "depthwise"}), CONV),
]


def test_building_and_compiling_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    for spec, target in SPECS:
        build_kernel(spec, target, init_seed=5)
        create_artifact(spec, target, init_seed=5)
        compile_blueprint(spec, target, init_seed=5, latency_trials=1)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_weights_equal_a_build_under_the_seeded_global_rng() -> None:
    """The private generator draws exactly what nn.Linear/Conv would draw after manual_seed."""
    spec, target = SPECS[1]
    kernel = build_kernel(spec, target, init_seed=9)
    torch.manual_seed(9)
    reference = (torch.nn.LayerNorm(12), torch.nn.Linear(12, 16), torch.nn.Linear(16, 6))
    assert torch.equal(kernel.down.weight, reference[1].weight)
    assert torch.equal(kernel.down.bias, reference[1].bias)
    assert torch.count_nonzero(kernel.up.weight) == 0  # the output stage starts at zero


def test_a_background_build_does_not_change_the_training_threads_draws() -> None:
    torch.manual_seed(0)
    expected = torch.rand(1000)
    torch.manual_seed(0)
    worker = threading.Thread(
        target=lambda: [build_kernel(s, t, init_seed=1) for s, t in SPECS * 20]
    )
    worker.start()
    drawn = torch.cat([torch.rand(10) for _ in range(100)])
    worker.join()
    assert torch.equal(drawn, expected)
