"""Seed lifecycle: the states a seed can be in and the one table of legal transitions."""

from __future__ import annotations

from enum import IntEnum

from esper.errors import IllegalTransitionError


class SeedState(IntEnum):
    """Lifecycle state of one seed. Stored on the device as its integer value (int8)."""

    DORMANT = 0
    """No kernel; the seed computes nothing and the layer's output is exactly the base output."""
    LOADING = 1
    """A kernel was requested and is being fetched/built off the training thread."""
    BLENDING = 2
    """The kernel is grafted; its alpha ramps from 0 to 1 over the configured number of steps."""
    ACTIVE = 3
    """The kernel runs at full alpha and trains with the host."""
    FOSSILIZED = 4
    """The kernel is kept permanently: it can be merged into the base layer by ``unwrap``."""
    ERROR_RECOVERY = 5
    """The kernel faulted; it is bypassed (contributes zero) and retried with backoff."""

    @property
    def runs_kernel(self) -> bool:
        """Whether a seed in this state executes its kernel in forward."""
        return self in _KERNEL_RUNNING_STATES


_KERNEL_RUNNING_STATES = frozenset({SeedState.BLENDING, SeedState.ACTIVE, SeedState.FOSSILIZED})

TRANSITIONS: dict[SeedState, frozenset[SeedState]] = {
    SeedState.DORMANT: frozenset({SeedState.LOADING}),
    SeedState.LOADING: frozenset({SeedState.BLENDING, SeedState.DORMANT, SeedState.ERROR_RECOVERY}),
    SeedState.BLENDING: frozenset({SeedState.ACTIVE, SeedState.DORMANT, SeedState.ERROR_RECOVERY}),
    SeedState.ACTIVE: frozenset(
        {SeedState.FOSSILIZED, SeedState.DORMANT, SeedState.ERROR_RECOVERY}
    ),
    # A fossilized kernel is permanent, but a fault must still be able to quarantine it.
    SeedState.FOSSILIZED: frozenset({SeedState.ERROR_RECOVERY}),
    SeedState.ERROR_RECOVERY: frozenset({SeedState.LOADING, SeedState.DORMANT}),
}
"""Legal lifecycle transitions: ``TRANSITIONS[src]`` is the set of states ``src`` may move to."""


def is_legal_transition(src: SeedState, dst: SeedState) -> bool:
    """Return whether ``src -> dst`` is in the transition table."""
    return dst in TRANSITIONS[src]


def check_transition(src: SeedState, dst: SeedState, *, where: str = "seed") -> None:
    """Raise :class:`IllegalTransitionError` unless ``src -> dst`` is a legal transition.

    Args:
        src: current state.
        dst: requested state.
        where: a name for the seed in the message, e.g. ``"layer 'fc1' seed 2"``.
    """
    if is_legal_transition(src, dst):
        return
    allowed = ", ".join(s.name for s in sorted(TRANSITIONS[src])) or "none (terminal)"
    raise IllegalTransitionError(
        f"{where}: illegal lifecycle transition {src.name} -> {dst.name}; "
        f"from {src.name} the legal next states are: {allowed}."
    )
