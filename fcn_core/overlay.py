"""Which test wafers the test overlay draws: a few patterned wafers of every class, then the worst misses.

The wafers with the most fail dies are random or near-full maps (plain grey in truth and
prediction), so the overlay picks by truth instead: for each pattern class the wafers where that
class covers the most dies, then the wafers whose fail dies the model got most wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fcn_core.table import FAIL


@dataclass(frozen=True)
class OverlayPick:
    """One wafer of the overlay: its index in the set, why it was drawn, and its panel title."""

    index: int
    reason: str  # "pattern" or "worst miss"
    pattern: str | None  # the pattern it shows (reason "pattern")
    fail_die_accuracy: float | None  # share of its fail dies predicted right (None: no prediction)
    title: str


def fail_die_accuracy(label: np.ndarray | None, prediction: np.ndarray | None, die: np.ndarray) -> float | None:
    """Share of the wafer's fail dies whose predicted class is the true one; None without fail dies or labels."""
    if label is None or prediction is None:
        return None
    fails = np.asarray(die) == FAIL
    if not fails.any():
        return None
    return float((np.asarray(prediction)[fails] == np.asarray(label)[fails]).mean())


def pick_overlay_wafers(
    wafer_ids: Sequence[str],
    die_maps: Sequence[np.ndarray],
    label_maps: Sequence[np.ndarray | None],
    predictions: Sequence[np.ndarray] | None,
    *,
    class_names: Sequence[str],
    per_class: int = 2,
    worst: int = 4,
) -> list[OverlayPick]:
    """``per_class`` wafers of each pattern class (class 1.. of ``class_names``; those whose truth gives the
    class the most dies), then the ``worst`` other wafers with the lowest fail-die accuracy.
    A wafer drawn for one class counts for every class its truth shows; a class absent from the truth
    is skipped; a wafer is drawn once."""
    if not (len(wafer_ids) == len(die_maps) == len(label_maps)):
        raise ValueError("wafer_ids, die_maps and label_maps must have the same length")
    if predictions is not None and len(predictions) != len(die_maps):
        raise ValueError(f"{len(predictions)} predictions for {len(die_maps)} wafers")
    accuracy = [fail_die_accuracy(label, predictions[i] if predictions is not None else None, die_maps[i])
                for i, label in enumerate(label_maps)]
    taken: set[int] = set()
    picks: list[OverlayPick] = []

    def note(i: int) -> str:
        return "" if accuracy[i] is None else f", fail-die acc {accuracy[i]:.2f}"

    for cls, name in enumerate(class_names[1:], start=1):
        dies = np.array([0 if label is None else int((np.asarray(label) == cls).sum()) for label in label_maps])
        already = sum(1 for i in taken if dies[i] > 0)  # drawn for an earlier class, showing this one too
        order = [int(i) for i in np.argsort(-dies, kind="stable") if dies[i] > 0 and int(i) not in taken]
        for i in order[:max(0, per_class - already)]:
            taken.add(i)
            picks.append(OverlayPick(i, "pattern", name, accuracy[i], f"{wafer_ids[i]}: {name} (truth){note(i)}"))
    scored = sorted((acc, i) for i, acc in enumerate(accuracy) if acc is not None and i not in taken)
    for acc, i in scored[:worst]:
        taken.add(i)
        picks.append(OverlayPick(i, "worst miss", None, acc, f"{wafer_ids[i]}: worst miss{note(i)}"))
    return picks
