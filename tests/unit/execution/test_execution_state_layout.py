"""Seed state layout: device buffers with a host mirror; validated transitions change nothing when
illegal; the mirror rebuilds from the buffers; a layer saves it under the keys it always had."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable

import pytest
import torch
from torch import nn

from esper.contracts import TRANSITIONS, SeedState, is_legal_transition
from esper.errors import IllegalTransitionError
from esper.execution import KasminaLayer, SeedStateLayout

Graft = Callable[..., nn.Module]  # the conftest fixture: (layer, seed_idx, spec) -> kernel


def _path_to(state: SeedState) -> list[SeedState]:
    """The shortest legal path of states from DORMANT to ``state`` (DORMANT excluded)."""
    parents: dict[SeedState, SeedState | None] = {SeedState.DORMANT: None}
    queue = deque([SeedState.DORMANT])
    while queue:
        current = queue.popleft()
        for nxt in sorted(TRANSITIONS[current]):
            if nxt not in parents:
                parents[nxt] = current
                queue.append(nxt)
    path = []
    node: SeedState | None = state
    while node is not None and node is not SeedState.DORMANT:
        path.append(node)
        node = parents[node]
    return path[::-1]


def _layout_in(state: SeedState, seed_idx: int = 1) -> SeedStateLayout:
    layout = SeedStateLayout(3)
    for step in _path_to(state):
        layout.transition(seed_idx, step, where="test")
    assert layout.slots[seed_idx].state is state
    return layout


def test_buffers_have_documented_shapes_and_dtypes() -> None:
    layout = SeedStateLayout(5)
    buffers = dict(layout.named_buffers())

    expected = {
        "lifecycle": ((5,), torch.int8),
        "alpha": ((5,), torch.float32),
        "kernel_id": ((5, 32), torch.uint8),
        "error_count": ((5,), torch.int32),
        "retry_after_step": ((5,), torch.int64),
        "blend_steps": ((5,), torch.int32),
        "layer_health": ((4,), torch.float32),
        "seed_health": ((5, 3), torch.float32),
    }
    assert {name: (tuple(b.shape), b.dtype) for name, b in buffers.items()} == expected
    assert all(int(b.abs().sum()) == 0 for b in buffers.values())
    assert layout.num_seeds == 5
    assert [s.state for s in layout.slots] == [SeedState.DORMANT] * 5
    assert layout.running == ()


@pytest.mark.parametrize(
    ("src", "dst"), list(itertools.product(SeedState, SeedState)), ids=lambda s: s.name
)
def test_every_transition_follows_the_table(src: SeedState, dst: SeedState) -> None:
    layout = _layout_in(src)
    before = {name: b.clone() for name, b in layout.named_buffers()}

    if is_legal_transition(src, dst):
        layout.transition(1, dst, where="test")
        assert layout.slots[1].state is dst
        assert layout.lifecycle.tolist() == [0, int(dst), 0]
        assert layout.running == ((1,) if dst.runs_kernel else ())
    else:
        with pytest.raises(IllegalTransitionError):
            layout.transition(1, dst, where="test")
        assert layout.slots[1].state is src
        for name, buffer in layout.named_buffers():
            assert torch.equal(buffer, before[name]), name
        assert layout.running == ((1,) if src.runs_kernel else ())
    # Other seeds are never touched.
    assert layout.slots[0].state is SeedState.DORMANT
    assert layout.slots[2].state is SeedState.DORMANT


def test_setters_write_through_to_the_buffers() -> None:
    layout = SeedStateLayout(2)
    kernel_id = bytes(range(32)).hex()

    layout.set_alpha(1, 0.375)
    layout.set_blend_steps(1, 7)
    layout.set_kernel_id(1, kernel_id)
    layout.set_errors(1, error_count=2, retry_after_step=40)

    assert layout.alpha.tolist() == [0.0, 0.375]
    assert layout.blend_steps.tolist() == [0, 7]
    assert layout.kernel_id[1].tolist() == list(range(32))
    assert layout.kernel_id[0].tolist() == [0] * 32
    assert layout.error_count.tolist() == [0, 2]
    assert layout.retry_after_step.tolist() == [0, 40]
    slot = layout.slots[1]
    assert (slot.alpha, slot.blend_steps_done, slot.kernel_id) == (0.375, 7, kernel_id)
    assert (slot.error_count, slot.retry_after_step) == (2, 40)
    layout.set_kernel_id(1, None)
    assert layout.kernel_id[1].tolist() == [0] * 32
    assert layout.slots[1].kernel_id is None


def test_mirror_is_rebuilt_from_loaded_buffers() -> None:
    source = _layout_in(SeedState.ACTIVE)
    kernel_id = "ab" * 32
    source.set_alpha(1, 1.0)
    source.set_kernel_id(1, kernel_id)
    source.set_blend_steps(1, 20)
    source.set_errors(1, error_count=1, retry_after_step=12)

    restored = SeedStateLayout(3)
    restored.load_state_dict(source.state_dict())
    restored.reload_from_buffers()

    assert restored.slots == source.slots
    assert restored.running == (1,)
    assert restored.slots[1].kernel_id == kernel_id


def test_reset_health_zeroes_the_accumulators_only() -> None:
    layout = SeedStateLayout(2)
    layout.set_alpha(0, 0.5)
    layout.layer_health.fill_(3.0)
    layout.seed_health.fill_(2.0)

    layout.reset_health()

    assert torch.equal(layout.layer_health, torch.zeros(4))
    assert torch.equal(layout.seed_health, torch.zeros(2, 3))
    assert layout.alpha.tolist() == [0.5, 0.0]


SEED_LAYOUT_KEYS = [
    f"seed_state.{name}"
    for name in (
        "lifecycle",
        "alpha",
        "kernel_id",
        "error_count",
        "retry_after_step",
        "blend_steps",
        "layer_health",
        "seed_health",
    )
]
"""The state-dict keys of a layer's seed layout, as every checkpoint so far has them."""


def test_the_seed_layout_keeps_the_checkpoint_keys_it_always_had(graft: Graft) -> None:
    layer = KasminaLayer(nn.Linear(8, 6), num_seeds=2, health_every=0)
    graft(layer, 1)
    layer.set_alpha(1, 0.5)
    state = layer.state_dict()
    keys = list(state)
    assert keys[:2] == ["base.weight", "base.bias"]
    assert keys[2:10] == SEED_LAYOUT_KEYS
    assert keys[10] == "seeds.1.spec" and all(k.startswith("seeds.1.kernel.") for k in keys[11:])
    assert layer.seed_layout is dict(layer.named_children())["seed_state"]
    # A checkpoint written before ``layer.seed_layout`` had that name (same keys) loads into it.
    saved = {k: v.clone() for k, v in state.items()}
    restored = KasminaLayer(nn.Linear(8, 6), num_seeds=2, health_every=0)
    restored.load_state_dict(saved)
    assert restored.seed_states == (SeedState.DORMANT, SeedState.BLENDING)
    assert restored.seed_layout.slots[1].alpha == 0.5
    assert restored.seed_layout.slots[1].kernel_id == layer.seed_layout.slots[1].kernel_id
    x = torch.randn(3, 8)
    assert torch.equal(restored(x), layer(x))
