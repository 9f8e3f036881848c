"""Weak labels for real maps and the fixed fine-tune / held-out split."""

from __future__ import annotations

import numpy as np
import pytest

from fcn_core.config import DEFAULT_CLASSES
from fcn_core.table import FAIL, NO_DIE, PASS, label_maps, make_table
from fcn_core.validate import validate_table
from fcn_core.verdicts import UNLABELLED
from fcn_core.weak import holdout_mask, weak_label_table

CLASSES = [c.name for c in DEFAULT_CLASSES]  # background, ring, scratch, local zone, circle


def _die(fails: int) -> np.ndarray:
    die = np.full((5, 6), PASS, np.uint8)
    die[0, 0] = NO_DIE
    die.flat[1:1 + fails] = FAIL
    return die


def _table(labels: list[str | None], lots: list[str | None] | None = None):
    n = len(labels)
    return make_table(wafer_ids=[f"w{i}" for i in range(n)], die_maps=[_die(i + 1) for i in range(n)],
                      wafer_labels=labels, lot_ids=lots)


def test_fail_dies_of_single_label_maps_take_that_class() -> None:
    t = _table(["Edge-Ring", "Scratch", "None", "Random", "Center", "Loc"])
    weak, report = weak_label_table(t, class_names=CLASSES)
    assert weak.column("wafer_id").to_pylist() == ["w0", "w1", "w2", "w3", "w4", "w5"]
    expected = [1, 2, 0, 0, 4, 3]  # ring, scratch, none, none, circle, local zone
    for lab, die, cls in zip(label_maps(weak), [_die(i + 1) for i in range(6)], expected):
        assert (lab[die == FAIL] == cls).all()
        assert (lab[die != FAIL] == 0).all()
    assert report.kept == {"circle": 1, "local zone": 1, "none": 2, "ring": 1, "scratch": 1}
    assert validate_table(weak, n_classes=len(CLASSES)).valid.num_rows == 6  # a valid wafer table


def test_unusable_labels_are_dropped_and_counted() -> None:
    t = _table(["Near-full", None, "Center+Scratch", "Donut+Edge-Ring", "Edge-Loc"])
    weak, report = weak_label_table(t, class_names=CLASSES)
    assert weak.column("wafer_id").to_pylist() == ["w3", "w4"]  # Donut+Edge-Ring is one pattern: ring
    assert report.dropped == {"Near-full": 1, UNLABELLED: 1, "Center+Scratch": 1}


def test_max_per_class_caps_the_majority_reproducibly() -> None:
    t = _table(["None"] * 10 + ["Scratch"] * 2)
    a, report = weak_label_table(t, class_names=CLASSES, max_per_class=3, seed=4)
    b, _ = weak_label_table(t, class_names=CLASSES, max_per_class=3, seed=4)
    assert report.kept == {"none": 3, "scratch": 2}
    assert a.column("wafer_id").to_pylist() == b.column("wafer_id").to_pylist()


def test_labels_outside_the_configured_classes_are_an_error() -> None:
    with pytest.raises(ValueError, match="not configured classes"):
        weak_label_table(_table(["Scratch"]), class_names=["background", "ring"])


def test_missing_wafer_label_column_is_an_error() -> None:
    t = _table(["Scratch"]).drop_columns(["wafer_label"])
    with pytest.raises(ValueError, match="wafer_label"):
        weak_label_table(t, class_names=CLASSES)


def test_holdout_is_stable_keeps_lots_together_and_has_the_asked_share() -> None:
    n = 2000
    lots = [f"lot{i // 5}" for i in range(n)]
    t = make_table(wafer_ids=[f"w{i}" for i in range(n)], die_maps=[_die(1)] * n, lot_ids=lots)
    mask = holdout_mask(t, fraction=0.3)
    assert np.array_equal(mask, holdout_mask(t, fraction=0.3))
    assert 0.25 < mask.mean() < 0.35
    per_lot = {}
    for lot, held in zip(lots, mask):
        per_lot.setdefault(lot, set()).add(bool(held))
    assert all(len(v) == 1 for v in per_lot.values())


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_holdout_fraction_must_be_a_proper_share(fraction: float) -> None:
    with pytest.raises(ValueError, match="strictly between"):
        holdout_mask(_table(["None"]), fraction=fraction)
