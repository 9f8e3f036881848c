"""The test overlay's wafers: every pattern class of the truth a few times, then the worst misses."""

from __future__ import annotations

import numpy as np
import pytest

from fcn_core.overlay import fail_die_accuracy, pick_overlay_wafers
from fcn_core.table import FAIL, PASS

NAMES = ["none", "center", "edge-ring", "scratch"]


def _wafer(pattern: int, n_fail: int, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    die = np.full((size, size), PASS, np.uint8)
    label = np.zeros((size, size), np.uint8)
    die.flat[:n_fail] = FAIL
    label.flat[:n_fail] = pattern
    return die, label


def _set():
    # many near-full random wafers (class 0 on every fail die) and a few small patterned ones
    specs = [(0, 60)] * 10 + [(1, 5), (1, 9), (1, 3), (2, 4), (3, 2), (3, 6)]
    dies, labels = zip(*(_wafer(p, n) for p, n in specs), strict=True)
    ids = [f"w{i}" for i in range(len(specs))]
    return ids, list(dies), list(labels)


def test_every_pattern_class_is_drawn_twice_where_the_truth_has_two():
    ids, dies, labels = _set()
    picks = pick_overlay_wafers(ids, dies, labels, labels, class_names=NAMES, per_class=2, worst=0)
    shown = {name: [p for p in picks if p.pattern == name] for name in NAMES[1:]}
    assert {k: len(v) for k, v in shown.items()} == {"center": 2, "edge-ring": 1, "scratch": 2}
    # the chosen wafers' truth carries every pattern class
    carried = set().union(*(set(np.unique(labels[p.index][dies[p.index] == FAIL])) for p in picks))
    assert carried >= {1, 2, 3}
    assert [p.index for p in shown["center"]] == [11, 10]  # the most dies of the class first
    assert all(NAMES[1] in p.title for p in shown["center"])


def test_worst_misses_follow_the_patterns_lowest_fail_die_accuracy_first():
    ids, dies, labels = _set()
    predictions = [label.copy() for label in labels]
    predictions[3][dies[3] == FAIL] = 2  # w3 all wrong
    predictions[5].flat[:30] = 1  # w5 half wrong
    picks = pick_overlay_wafers(ids, dies, labels, predictions, class_names=NAMES, per_class=1, worst=2)
    misses = [p for p in picks if p.reason == "worst miss"]
    assert [(p.index, p.fail_die_accuracy) for p in misses] == [(3, 0.0), (5, 0.5)]
    assert misses[0].title == "w3: worst miss, fail-die acc 0.00"
    assert len({p.index for p in picks}) == len(picks)  # a wafer is drawn once


def test_fail_die_accuracy_is_none_without_fail_dies_or_prediction():
    die, label = _wafer(1, 0)
    assert fail_die_accuracy(label, label, die) is None
    die, label = _wafer(1, 4)
    assert fail_die_accuracy(label, None, die) is None
    assert fail_die_accuracy(label, label, die) == 1.0


def test_mismatched_lengths_are_refused():
    ids, dies, labels = _set()
    with pytest.raises(ValueError, match="same length"):
        pick_overlay_wafers(ids[:-1], dies, labels, None, class_names=NAMES)
    with pytest.raises(ValueError, match="predictions"):
        pick_overlay_wafers(ids, dies, labels, labels[:-1], class_names=NAMES)


def test_a_wafer_drawn_for_one_class_counts_for_the_others_its_truth_shows():
    die, label = _wafer(1, 12)
    label.flat[6:12] = 2  # center and edge-ring on one wafer
    other_die, other_label = _wafer(2, 3)
    picks = pick_overlay_wafers(["both", "ring"], [die, other_die], [label, other_label], None,
                                class_names=NAMES[:3], per_class=1, worst=0)
    assert [p.index for p in picks] == [0]  # edge-ring is on wafer 0 already
