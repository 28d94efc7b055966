"""KasminaLayer: blending formula per layer kind, alpha ramp, lifecycle calls, events, hooks."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from esper.contracts import BlueprintSpec, SeedState
from esper.errors import (
    ConfigurationError,
    IllegalTransitionError,
    KernelShapeMismatchError,
    SeedIndexError,
)
from esper.execution import KasminaLayer, KernelCache

AddArtifact = Callable[..., str]  # the conftest fixture: (target, spec, init_seed) -> kernel id
Graft = Callable[..., nn.Module]  # the conftest fixture: (layer, seed_idx, spec) -> kernel

LOWRANK = BlueprintSpec(family="lowrank_adapter", params={"rank": 2})


@dataclass(frozen=True)
class Kind:
    """One supported layer kind: a host module, an input, and what its kernels read."""

    name: str
    make_base: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    spec: BlueprintSpec
    reads_output: bool = False
    attention: bool = False

    def call(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.attention:
            out = module(x, x, x)
            assert isinstance(out, tuple)
            return out[0]
        return module(x)


RESIDUAL = BlueprintSpec(family="residual_mlp", params={"hidden": 5})
CONV = BlueprintSpec(family="conv_adapter", params={"hidden": 3})

KINDS = [
    Kind("linear", lambda: nn.Linear(8, 6), (4, 8), LOWRANK),
    Kind("linear_3d", lambda: nn.Linear(8, 6), (2, 3, 8), RESIDUAL),
    Kind("layer_norm", lambda: nn.LayerNorm(6), (3, 5, 6), RESIDUAL),
    Kind("batch_norm1d_2d", lambda: nn.BatchNorm1d(6), (5, 6), RESIDUAL),
    Kind("batch_norm1d_3d", lambda: nn.BatchNorm1d(6), (4, 6, 7), LOWRANK),
    Kind("batch_norm2d", lambda: nn.BatchNorm2d(4), (2, 4, 5, 5), CONV),
    Kind("conv1d", lambda: nn.Conv1d(3, 6, 3, stride=2), (2, 3, 11), CONV, reads_output=True),
    Kind("conv2d", lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 6, 6), CONV, reads_output=True),
    Kind(
        "multihead_attention",
        lambda: nn.MultiheadAttention(8, 2, batch_first=True),
        (2, 5, 8),
        LOWRANK,
        reads_output=True,
        attention=True,
    ),
]


def _layer(kind: Kind, **kwargs: object) -> KasminaLayer:
    torch.manual_seed(0)
    base = kind.make_base()
    with torch.no_grad():  # non-trivial norm affine parameters and running statistics
        for name, p in base.named_parameters():
            if "norm" in type(base).__name__.lower() or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return KasminaLayer(base, layer_name=kind.name, **kwargs)  # type: ignore[arg-type]


def _expected(
    kind: Kind, base: nn.Module, kernels: list[tuple[float, nn.Module]], x: torch.Tensor
) -> torch.Tensor:
    """The documented formula, written out: ``base(x) + Σ alpha_i · kernel_i(u)``."""
    h = kind.call(base, x)
    u = h if kind.reads_output else x
    y = h
    for alpha, kernel in kernels:
        y = y + alpha * kernel(u)
    return y


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_blending_formula_matches_a_hand_written_computation(kind: Kind, graft: Graft) -> None:
    layer = _layer(kind, num_seeds=2)
    kernel = graft(layer, 0, kind.spec)
    layer.set_alpha(0, 0.7)
    reference_base = copy.deepcopy(layer.base)  # BatchNorm updates its statistics in train mode
    x = torch.randn(kind.input_shape)

    y = kind.call(layer, x)

    expected = _expected(kind, reference_base, [(0.7, kernel)], x)
    base_only = kind.call(copy.deepcopy(reference_base), x)
    assert y.shape == base_only.shape
    assert not torch.allclose(y, base_only, atol=1e-4)  # the kernel really contributes
    assert torch.allclose(y, expected, atol=1e-5, rtol=1e-5)
    for name, buffer in reference_base.named_buffers():  # the base still ran exactly once
        assert torch.equal(dict(layer.base.named_buffers())[name], buffer), name


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_two_seeds_add_up(kind: Kind, graft: Graft) -> None:
    layer = _layer(kind, num_seeds=3).eval()
    first = graft(layer, 0, kind.spec)
    second = graft(layer, 2, kind.spec)
    layer.set_alpha(0, 0.25)
    layer.set_alpha(2, 0.5)
    x = torch.randn(kind.input_shape)

    y = kind.call(layer, x)

    expected = _expected(kind, layer.base, [(0.25, first), (0.5, second)], x)
    assert torch.allclose(y, expected, atol=1e-5, rtol=1e-5)
    only_first = _expected(kind, layer.base, [(0.25, first)], x)
    assert not torch.allclose(y, only_first, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_grafting_is_function_preserving_at_alpha_0_and_1(kind: Kind, graft: Graft) -> None:
    layer = _layer(kind, num_seeds=2).eval()
    x = torch.randn(kind.input_shape, requires_grad=True)
    expected = kind.call(layer.base, x)
    expected.square().sum().backward()
    expected_grads = [p.grad.clone() for p in layer.base.parameters()]  # type: ignore[union-attr]
    expected_x_grad = x.grad.clone()  # type: ignore[union-attr]

    graft(layer, 0, kind.spec, perturb=False)
    assert layer.seed_states[0] is SeedState.BLENDING
    assert layer.seed_layout.slots[0].alpha == 0.0
    assert torch.equal(kind.call(layer, x), expected)

    layer.set_alpha(0, 1.0)
    layer.base.zero_grad()
    x.grad = None
    y = kind.call(layer, x)
    y.square().sum().backward()

    assert torch.equal(y, expected)
    assert torch.equal(x.grad, expected_x_grad)  # type: ignore[arg-type]
    for p, g in zip(layer.base.parameters(), expected_grads, strict=True):
        assert torch.equal(p.grad, g)  # type: ignore[arg-type]


def test_gradients_reach_a_fresh_kernel_at_alpha_1(graft: Graft) -> None:
    # LoRA-style start: the zero output projection gets a gradient, so training moves it.
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=1)
    kernel = graft(layer, 0, perturb=False)
    layer.set_alpha(0, 1.0)

    layer(torch.randn(4, 8)).square().sum().backward()

    grads = dict(kernel.named_parameters())
    assert grads["up.weight"].grad is not None
    assert grads["up.weight"].grad.abs().sum() > 0
    assert torch.equal(grads["down.weight"].grad, torch.zeros(2, 8))  # type: ignore[arg-type]


def test_alpha_ramps_linearly_then_the_seed_is_active(graft: Graft) -> None:
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=2, blend_steps=4, health_every=0)
    kernel = graft(layer, 1)
    x = torch.randn(3, 8)
    seen = []

    for step in range(1, 7):
        alpha = layer.seed_layout.slots[1].alpha
        y = layer(x)
        assert torch.allclose(y, layer.base(x) + alpha * kernel(x), atol=1e-6)
        seen.append((layer.seed_states[1], alpha, float(layer.seed_layout.alpha[1])))
        layer.advance(step)

    B, A = SeedState.BLENDING, SeedState.ACTIVE
    assert seen == [
        (B, 0.0, 0.0),
        (B, 0.25, 0.25),
        (B, 0.5, 0.5),
        (B, 0.75, 0.75),
        (A, 1.0, 1.0),
        (A, 1.0, 1.0),
    ]
    assert layer.seed_layout.blend_steps.tolist() == [0, 4]
    assert layer.seed_states[0] is SeedState.DORMANT


def test_a_load_finished_in_the_background_is_grafted_at_alpha_0_at_the_next_step(
    cache: KernelCache, add_artifact: AddArtifact
) -> None:
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=1, blend_steps=4, health_every=0)
    layer.attach(cache)
    kernel_id = add_artifact(layer.target())

    future = layer.request_kernel(0, kernel_id)
    assert layer.seed_states == (SeedState.LOADING,)
    assert layer.seed_layout.slots[0].kernel_id == kernel_id
    assert layer.kernel(0) is None
    future.result(timeout=30)
    assert layer.seed_states == (SeedState.LOADING,)  # nothing changes between steps

    alphas = []
    for step in range(1, 7):
        layer.advance(step)
        alphas.append((layer.seed_states[0], layer.seed_layout.slots[0].alpha))

    B, A = SeedState.BLENDING, SeedState.ACTIVE
    assert alphas == [(B, 0.0), (B, 0.25), (B, 0.5), (B, 0.75), (A, 1.0), (A, 1.0)]
    assert layer.kernel(0) is not None


def test_an_optimizer_step_changes_the_kernel(graft: Graft) -> None:
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=1)
    kernel = graft(layer, 0)
    layer.set_alpha(0, 1.0)
    before = {k: v.clone() for k, v in kernel.state_dict().items()}
    optimizer = torch.optim.SGD(kernel.parameters(), lr=0.1)

    layer(torch.randn(4, 8)).square().sum().backward()
    optimizer.step()

    for name, tensor in kernel.state_dict().items():
        assert not torch.equal(tensor, before[name]), name


def test_fossilize_keeps_the_kernel_running(graft: Graft) -> None:
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=1, blend_steps=1, health_every=0)
    kernel = graft(layer, 0)
    layer.advance(1)
    assert layer.seed_states == (SeedState.ACTIVE,)

    layer.fossilize(0)
    x = torch.randn(2, 8)

    assert layer.seed_states == (SeedState.FOSSILIZED,)
    assert layer.seed_layout.lifecycle.tolist() == [int(SeedState.FOSSILIZED)]
    assert torch.allclose(layer(x), layer.base(x) + kernel(x), atol=1e-6)
    layer.advance(2)  # nothing ramps or drops a fossilized kernel
    assert layer.kernel(0) is kernel
    with pytest.raises(IllegalTransitionError):
        layer.unload(0)
    assert layer.seed_states == (SeedState.FOSSILIZED,)


def _snapshot(layer: KasminaLayer) -> tuple[object, ...]:
    return (
        layer.seed_states,
        [copy.copy(s) for s in layer.seed_layout.slots],
        {k: v.clone() for k, v in layer.seed_layout.state_dict().items()},
        [layer.kernel(i) for i in range(layer.num_seeds)],
    )


def _same(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    states_a, slots_a, buffers_a, kernels_a = a
    states_b, slots_b, buffers_b, kernels_b = b
    return (
        states_a == states_b
        and slots_a == slots_b
        and all(torch.equal(buffers_a[k], buffers_b[k]) for k in buffers_a)  # type: ignore[index, union-attr]
        and all(x is y for x, y in zip(kernels_a, kernels_b, strict=True))  # type: ignore[call-overload]
    )


def test_illegal_lifecycle_calls_raise_and_change_nothing(
    graft: Graft, add_artifact: AddArtifact
) -> None:
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=2, blend_steps=2, health_every=0)
    graft(layer, 0)  # seed 0 BLENDING, seed 1 DORMANT
    other_id = add_artifact(layer.target(), init_seed=9)
    before = _snapshot(layer)

    with pytest.raises(IllegalTransitionError, match="BLENDING -> FOSSILIZED"):
        layer.fossilize(0)
    with pytest.raises(IllegalTransitionError, match="DORMANT -> FOSSILIZED"):
        layer.fossilize(1)
    with pytest.raises(IllegalTransitionError, match="DORMANT -> DORMANT"):
        layer.unload(1)
    with pytest.raises(IllegalTransitionError, match="BLENDING -> LOADING"):
        layer.request_kernel(0, other_id)

    assert _same(_snapshot(layer), before)
    assert layer.seed_layout.slots[0].kernel_id != other_id


def test_unload_returns_the_seed_to_an_exact_dormant_state(graft: Graft) -> None:
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=2, health_every=0)
    graft(layer, 0)
    graft(layer, 1)
    layer.set_alpha(1, 0.5)
    x = torch.randn(3, 8)

    layer.unload(0)
    layer.unload(1)

    assert layer.seed_states == (SeedState.DORMANT, SeedState.DORMANT)
    assert layer.kernel(0) is None and layer.kernel(1) is None
    assert len(layer.seeds) == 0
    assert layer.seed_layout.alpha.tolist() == [0.0, 0.0]
    assert int(layer.seed_layout.kernel_id.sum()) == 0
    assert [s.kernel_id for s in layer.seed_layout.slots] == [None, None]
    assert torch.equal(layer(x), layer.base(x))
    assert not any(k.startswith("seeds.") for k in layer.state_dict())


def test_unload_cancels_a_pending_load(cache: KernelCache, add_artifact: AddArtifact) -> None:
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=1, health_every=0)
    layer.attach(cache)
    future = layer.request_kernel(0, add_artifact(layer.target()))
    future.result(timeout=30)

    layer.unload(0)
    layer.advance(1)

    assert layer.seed_states == (SeedState.DORMANT,)
    assert layer.kernel(0) is None


def test_set_alpha_is_validated(graft: Graft) -> None:
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=2)
    graft(layer, 0)

    with pytest.raises(ConfigurationError, match=r"within \[0, 1\]"):
        layer.set_alpha(0, 1.5)
    with pytest.raises(ConfigurationError, match=r"within \[0, 1\]"):
        layer.set_alpha(0, -0.1)
    with pytest.raises(ConfigurationError, match="DORMANT"):
        layer.set_alpha(1, 0.5)
    assert layer.seed_layout.alpha.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("bad_index", [-1, 3, 100, "0", 1.0])
def test_seed_index_out_of_range(bad_index: object) -> None:
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=3, layer_name="fc1")

    with pytest.raises(SeedIndexError, match=r"valid: 0\.\.2") as info:
        layer.unload(bad_index)  # type: ignore[arg-type]
    assert "'fc1'" in str(info.value)
    assert isinstance(info.value, IndexError)
    with pytest.raises(SeedIndexError):
        layer.kernel(bad_index)  # type: ignore[arg-type]
    with pytest.raises(SeedIndexError):
        layer.fossilize(bad_index)  # type: ignore[arg-type]


def test_request_without_a_cache_is_a_configuration_error() -> None:
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=1, layer_name="fc1")

    with pytest.raises(ConfigurationError, match="no kernel cache"):
        layer.request_kernel(0, "0" * 64)
    assert layer.seed_states == (SeedState.DORMANT,)


@pytest.mark.parametrize(
    "settings",
    [{"num_seeds": 0}, {"blend_steps": 0}, {"max_retries": -1}, {"retry_backoff_steps": 0}],
)
def test_invalid_seed_settings(settings: dict[str, int]) -> None:
    with pytest.raises(ConfigurationError, match=next(iter(settings))):
        KasminaLayer(nn.Linear(2, 2), **settings)  # type: ignore[arg-type]


def test_unsupported_base_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="GRU, which cannot carry seeds"):
        KasminaLayer(nn.GRU(4, 4), layer_name="rnn")


def test_kernel_built_for_another_geometry_is_refused(
    cache: KernelCache, add_artifact: AddArtifact
) -> None:
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=1, layer_name="fc1")
    layer.attach(cache)
    wrong_target = KasminaLayer(nn.Linear(6, 6)).target()
    kernel_id = add_artifact(wrong_target)
    entry = cache.get(kernel_id).result(timeout=30)

    layer.request_kernel(0, kernel_id).result(timeout=30)
    with pytest.raises(KernelShapeMismatchError, match="built for linear 6->6") as info:
        layer.graft(0, entry)
    assert "needs linear 8->6" in str(info.value)
    assert layer.seed_states == (SeedState.LOADING,)

    assert layer.complete_load(0)
    assert layer.seed_states == (SeedState.DORMANT,)
    assert isinstance(layer.last_errors[0], KernelShapeMismatchError)
    assert layer.kernel(0) is None
    assert layer.seed_layout.slots[0].kernel_id is None


class Recorder:
    """A real SeedEvents listener that records what it was told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, int, nn.Module]] = []

    def kernel_grafted(self, layer_name: str, seed_idx: int, module: nn.Module) -> None:
        self.events.append(("grafted", layer_name, seed_idx, module))

    def kernel_removed(self, layer_name: str, seed_idx: int, module: nn.Module) -> None:
        self.events.append(("removed", layer_name, seed_idx, module))


def test_structural_changes_are_reported(cache: KernelCache, graft: Graft) -> None:
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=2, layer_name="fc1")
    recorder = Recorder()
    layer.attach(cache, recorder)

    kernel = graft(layer, 1)
    layer.unload(1)

    assert recorder.events == [("grafted", "fc1", 1, kernel), ("removed", "fc1", 1, kernel)]


def test_base_hooks_still_run_while_dormant_and_while_morphed(graft: Graft) -> None:
    base = nn.Linear(8, 6)
    calls: list[int] = []
    base.register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    layer = KasminaLayer(base, num_seeds=1)

    layer(torch.randn(2, 8))
    graft(layer, 0)
    layer(torch.randn(3, 8))

    assert calls == [2, 3]


def test_attribute_access_falls_through_to_the_base() -> None:
    base = nn.MultiheadAttention(8, 2, batch_first=True)
    layer = KasminaLayer(base)

    assert layer.in_proj_weight is base.in_proj_weight
    assert layer.batch_first is True
    assert layer.embed_dim == 8
    with pytest.raises(AttributeError):
        _ = layer.no_such_attribute


def test_a_deep_copy_is_independent_and_computes_the_same(graft: Graft) -> None:
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=2, health_every=0)
    graft(layer, 0)
    layer.set_alpha(0, 0.5)
    x = torch.randn(3, 8)

    clone = copy.deepcopy(layer)

    assert torch.equal(clone(x), layer(x))
    assert clone.seed_states == layer.seed_states
    clone_kernel = clone.kernel(0)
    assert clone_kernel is not None and clone_kernel is not layer.kernel(0)
    with torch.no_grad():
        for p in clone_kernel.parameters():
            p.zero_()
    assert torch.equal(clone(x), clone.base(x))
    assert not torch.equal(layer(x), layer.base(x))


def test_stats_count_parameters_and_states(graft: Graft) -> None:
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=3, layer_name="fc1")
    graft(layer, 2)

    stats = layer.stats()

    assert stats.layer_name == "fc1"
    assert stats.base_parameters == 8 * 6 + 6
    assert stats.kernel_parameters == 2 * 8 + 6 * 2
    assert stats.seeds_by_state[SeedState.DORMANT] == 2
    assert stats.seeds_by_state[SeedState.BLENDING] == 1
    assert stats.kernel_ids[:2] == (None, None)
    assert stats.kernel_ids[2] == layer.seed_layout.slots[2].kernel_id


@pytest.mark.parametrize("bad_id", ["not-a-sha", "A" * 64, "0" * 63])
def test_a_malformed_kernel_id_changes_nothing(cache: KernelCache, bad_id: str) -> None:
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=1)
    layer.attach(cache)
    before = _snapshot(layer)

    with pytest.raises(ConfigurationError, match="invalid kernel id"):
        layer.request_kernel(0, bad_id)

    assert _same(_snapshot(layer), before)
    assert cache.stats().misses == 0
