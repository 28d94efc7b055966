"""Seed lifecycle table: exactly the documented transitions are legal, the rest raise."""

from __future__ import annotations

import itertools

import pytest

from esper.contracts import TRANSITIONS, SeedState, check_transition, is_legal_transition
from esper.errors import EsperError, IllegalTransitionError

S = SeedState

# The table of design.md ("Seed lifecycle"), written out independently of the code, plus the one
# documented extension: a fossilized kernel that faults can still be quarantined.
DOCUMENTED = {
    (S.DORMANT, S.LOADING),
    (S.LOADING, S.BLENDING),
    (S.BLENDING, S.ACTIVE),
    (S.ACTIVE, S.FOSSILIZED),
    (S.LOADING, S.DORMANT),
    (S.BLENDING, S.DORMANT),
    (S.ACTIVE, S.DORMANT),
    (S.LOADING, S.ERROR_RECOVERY),
    (S.BLENDING, S.ERROR_RECOVERY),
    (S.ACTIVE, S.ERROR_RECOVERY),
    (S.ERROR_RECOVERY, S.LOADING),
    (S.ERROR_RECOVERY, S.DORMANT),
    (S.FOSSILIZED, S.ERROR_RECOVERY),
}
ALL_PAIRS = list(itertools.product(SeedState, SeedState))


def test_table_is_exactly_the_documented_one() -> None:
    table = {(src, dst) for src, dsts in TRANSITIONS.items() for dst in dsts}

    assert table == DOCUMENTED
    assert set(TRANSITIONS) == set(SeedState)


@pytest.mark.parametrize(("src", "dst"), ALL_PAIRS, ids=lambda s: s.name)
def test_check_transition_agrees_with_the_table(src: SeedState, dst: SeedState) -> None:
    legal = (src, dst) in DOCUMENTED

    assert is_legal_transition(src, dst) is legal
    if legal:
        check_transition(src, dst)
    else:
        with pytest.raises(IllegalTransitionError) as info:
            check_transition(src, dst, where="layer 'fc1' seed 2")
        message = str(info.value)
        assert "layer 'fc1' seed 2" in message
        assert f"{src.name} -> {dst.name}" in message
        for allowed in TRANSITIONS[src]:
            assert allowed.name in message


def test_illegal_transition_error_is_an_esper_error() -> None:
    assert issubclass(IllegalTransitionError, EsperError)


def test_no_state_transitions_to_itself() -> None:
    assert not any(is_legal_transition(s, s) for s in SeedState)


def test_only_grafted_states_run_their_kernel() -> None:
    running = {s for s in SeedState if s.runs_kernel}

    assert running == {S.BLENDING, S.ACTIVE, S.FOSSILIZED}


def test_state_values_are_stable_integers() -> None:
    # Stored on the device as int8 and in checkpoints: renumbering would break old checkpoints.
    assert [int(s) for s in SeedState] == [0, 1, 2, 3, 4, 5]
    assert [s.name for s in SeedState] == [
        "DORMANT",
        "LOADING",
        "BLENDING",
        "ACTIVE",
        "FOSSILIZED",
        "ERROR_RECOVERY",
    ]
