"""Who serves: the promotion rule between the registered champion and a new candidate.

Pure: the registry (``tracking.registry``) gathers the champion's state (absent, re-scored on the
candidate's test split, or failing to load) and applies the returned :class:`Decision`. A champion
that fails to load keeps ``champion``: the failure may be transient (an artifact store that is
briefly unreachable), and a worse model must never take over silently. Only a deliberate override
(``tracking.replace_unloadable_champion``) replaces it, and the decision says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass(frozen=True)
class ChampionState:
    """The current champion as the registry found it: ``version`` None means there is none."""

    version: str | None = None
    score: float | None = None  # re-scored on the candidate's test split
    load_error: str | None = None  # why it did not load (then ``score`` is None)

    @classmethod
    def absent(cls) -> ChampionState:
        return cls()

    @classmethod
    def scored(cls, version: str, score: float) -> ChampionState:
        if not math.isfinite(score):
            raise ValueError(f"champion v{version} re-scored to {score}: a score must be a finite number")
        return cls(version=str(version), score=float(score))

    @classmethod
    def unloadable(cls, version: str, error: str) -> ChampionState:
        return cls(version=str(version), load_error=error)


@dataclass(frozen=True)
class Decision:
    alias: Literal["champion", "challenger"]  # the alias the candidate gets
    reason: str
    override: bool = False  # an unloadable champion was replaced because the override said so

    @property
    def promoted(self) -> bool:
        return self.alias == CHAMPION


def decide(champion: ChampionState, candidate_score: float, *, replace_unloadable: bool = False) -> Decision:
    """The candidate becomes champion if there is none or it scores at least the re-scored champion
    (ties go to the newer model); a champion that does not load stays unless ``replace_unloadable``."""
    if not math.isfinite(candidate_score):
        raise ValueError(f"candidate_score must be a finite number, got {candidate_score}")
    if champion.version is None:
        return Decision(CHAMPION, "first registered version")
    if champion.load_error is not None:
        failure = f"champion v{champion.version} does not load ({champion.load_error})"
        if replace_unloadable:
            return Decision(CHAMPION, f"{failure}: replaced by override tracking.replace_unloadable_champion",
                            override=True)
        return Decision(CHALLENGER, f"{failure}: it stays champion; set tracking.replace_unloadable_champion=true "
                                    "to replace it deliberately")
    if champion.score is None:
        raise ValueError(f"champion v{champion.version} has neither a score nor a load error")
    better = candidate_score >= champion.score
    return Decision(CHAMPION if better else CHALLENGER,
                    f"candidate {candidate_score:.4f} {'>=' if better else '<'} champion v{champion.version} "
                    f"re-scored {champion.score:.4f}")
