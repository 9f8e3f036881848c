"""fcn_core/promotion.py: who gets the champion alias."""

import math

import pytest

from fcn_core.promotion import CHALLENGER, CHAMPION, ChampionState, decide


def test_first_version_is_champion():
    decision = decide(ChampionState.absent(), 0.1)
    assert (decision.alias, decision.override, decision.promoted) == (CHAMPION, False, True)
    assert decision.reason == "first registered version"


@pytest.mark.parametrize("candidate,champion,alias", [(0.8, 0.7, CHAMPION), (0.7, 0.7, CHAMPION), (0.6, 0.7, CHALLENGER)])
def test_scored_champion_is_beaten_or_tied_only_by_a_score_at_least_as_good(candidate, champion, alias):
    decision = decide(ChampionState.scored("4", champion), candidate)
    assert decision.alias == alias and not decision.override
    assert "champion v4 re-scored 0.7000" in decision.reason


def test_unloadable_champion_is_never_replaced_without_the_override():
    state = ChampionState.unloadable("2", "FileNotFoundError: gone")
    kept = decide(state, 0.99)  # even a far better candidate: a transient failure never promotes
    assert (kept.alias, kept.override) == (CHALLENGER, False)
    assert "champion v2 does not load (FileNotFoundError: gone)" in kept.reason
    assert "replace_unloadable_champion" in kept.reason
    forced = decide(state, 0.01, replace_unloadable=True)
    assert (forced.alias, forced.override) == (CHAMPION, True)
    assert "override" in forced.reason


def test_the_override_changes_nothing_when_the_champion_loads():
    assert decide(ChampionState.scored("1", 0.9), 0.5, replace_unloadable=True).alias == CHALLENGER


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_scores_must_be_finite(bad):
    with pytest.raises(ValueError, match="finite"):
        decide(ChampionState.absent(), bad)
    with pytest.raises(ValueError, match="finite"):
        ChampionState.scored("1", bad)
