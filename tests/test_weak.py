"""Weak labels for real maps and the fixed fine-tune / held-out split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fcn_core.config import DEFAULT_CLASSES
from fcn_core.padding import IGNORE_INDEX, train_targets
from fcn_core.table import FAIL, NO_DIE, PASS, label_maps, make_table
from fcn_core.validate import validate_table
from fcn_core.verdicts import UNLABELLED
from fcn_core.config import LineSeedConfig
from fcn_core.weak import (IGNORE_LABEL, LineSeed, holdout_mask, pseudo_mask, pseudo_mask_table, taught_dies,
                            wafer_label_table, weak_label_table)

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


# -- pseudo-masks: weak labels that respect what the wafer label says -------------------------------
def _probs(die: np.ndarray, best: np.ndarray, p: float) -> np.ndarray:
    """(C, H, W) softmax with class ``best[y, x]`` at ``p`` and the rest spread evenly."""
    probs = np.full((len(CLASSES), *die.shape), (1 - p) / (len(CLASSES) - 1), np.float32)
    np.put_along_axis(probs, best[None].astype(np.int64), p, axis=0)
    return probs


def test_a_die_outside_the_labelled_patterns_is_never_taught_as_a_pattern() -> None:
    die = _die(12)
    for cls in range(len(CLASSES)):
        best = np.full(die.shape, cls)
        mask = pseudo_mask(die, _probs(die, best, 0.95), allowed={1}, min_prob=0.6)  # an Edge-Ring wafer
        fail = mask[die == FAIL]
        if cls == 1:
            assert (fail == 1).all()  # the labelled pattern, confident: taught
        elif cls == 0:
            assert (fail == 0).all()  # confidently background: a random fail, taught background
        else:
            assert (fail == IGNORE_LABEL).all()  # another pattern: ignored, never taught
        assert (mask[die != FAIL] == 0).all()


def test_uncertain_dies_are_ignored_and_pass_through_as_the_loss_ignore_index() -> None:
    die = _die(12)
    best = np.ones(die.shape, np.int64)
    mask = pseudo_mask(die, _probs(die, best, 0.5), allowed={1}, min_prob=0.6)
    assert (mask[die == FAIL] == IGNORE_LABEL).all()
    target = train_targets(die, mask)
    assert (target[torch.from_numpy(die == FAIL)] == IGNORE_INDEX).all()


def test_none_wafers_teach_background_and_mixes_allow_several_patterns() -> None:
    die = _die(12)
    best = np.where(np.arange(die.size).reshape(die.shape) % 2 == 0, 2, 3)  # scratch / local zone dies
    none = pseudo_mask(die, _probs(die, best, 0.99), allowed=set(), min_prob=0.6)
    assert (none[die == FAIL] == 0).all()
    mixed = pseudo_mask(die, _probs(die, best, 0.99), allowed={2, 3}, min_prob=0.6)
    assert set(np.unique(mixed[die == FAIL]).tolist()) == {2, 3}
    only_scratch = pseudo_mask(die, _probs(die, best, 0.99), allowed={2}, min_prob=0.6)
    assert set(np.unique(only_scratch[die == FAIL]).tolist()) == {2, IGNORE_LABEL}


# -- line seeds: a labelled scratch's faint dies, where they form a line -----------------------------
SCRATCH = CLASSES.index("scratch")
SEED = LineSeed(SCRATCH, min_prob=0.05, min_elongation=3.0, min_dies=4)


def _faint_line_wafer() -> tuple[np.ndarray, np.ndarray]:
    """A 12 x 12 map: a diagonal line of 8 fail dies painted ring (0.8) with 0.1 scratch, a 2 x 2 clump
    with the same 0.1 scratch, and a lone random fail die at 0.02 scratch. (die, probs)."""
    die = np.full((12, 12), PASS, np.uint8)
    probs = np.zeros((len(CLASSES), 12, 12), np.float32)
    probs[0] = 1.0
    line = [(2 + k, 1 + k) for k in range(8)]
    clump = [(1, 9), (1, 10), (2, 9), (2, 10)]
    for y, x in line + clump:
        die[y, x] = FAIL
        probs[:, y, x] = [0.05, 0.8, 0.1, 0.03, 0.02]
    die[10, 2] = FAIL
    probs[:, 10, 2] = [0.9, 0.02, 0.02, 0.03, 0.03]
    return die, probs


def test_a_line_seed_keeps_faint_dies_in_long_thin_groups_only() -> None:
    die, probs = _faint_line_wafer()
    seeded = SEED.dies(die, probs)
    assert seeded.sum() == 8 and seeded[2, 1] and seeded[9, 8]  # the diagonal line, all of it
    assert not seeded[1:3, 9:11].any() and not seeded[10, 2]  # the clump is not elongated; the lone die is faint
    assert not LineSeed(SCRATCH, 0.2, 3.0, 4).dies(die, probs).any()  # 0.1 is under a 0.2 bar
    assert not LineSeed(SCRATCH, 0.05, 3.0, 9).dies(die, probs).any()  # 8 dies are not 9
    assert not SEED.dies(np.where(die == FAIL, PASS, die), probs).any()  # pass dies are never seeds


def test_a_line_seed_teaches_a_labelled_scratch_over_a_confident_ring_but_never_an_unlabelled_one() -> None:
    die, probs = _faint_line_wafer()
    both = pseudo_mask(die, probs, allowed={1, SCRATCH}, min_prob=0.6, line_seed=SEED)  # Edge-Ring+Scratch
    plain = pseudo_mask(die, probs, allowed={1, SCRATCH}, min_prob=0.6)
    line = SEED.dies(die, probs)
    assert (both[line] == SCRATCH).all() and (plain[line] == 1).all()  # the seed overrides the ring call
    assert (both[~line] == plain[~line]).all()  # and nothing else: the clump stays ring, the lone die background
    ring_only = pseudo_mask(die, probs, allowed={1}, min_prob=0.6, line_seed=SEED)  # Edge-Ring: no scratch
    assert not (ring_only == SCRATCH).any() and (ring_only == plain).all()
    assert (pseudo_mask(die, probs, allowed=set(), min_prob=0.6, line_seed=SEED) == 0).all()  # None wafer


def test_line_seed_from_config_names_the_class_by_id() -> None:
    assert LineSeed.from_config(None, CLASSES) is None
    assert LineSeed.from_config(LineSeedConfig(), CLASSES) == LineSeed(SCRATCH, 0.05, 3.0, 4)
    assert LineSeed.from_config(LineSeedConfig(class_name="circle", min_prob=0.2), CLASSES).class_id == 4


def test_taught_dies_counts_fail_dies_only() -> None:
    die = _die(5)
    mask = np.zeros(die.shape, np.uint8)
    fails = np.flatnonzero(die == FAIL)
    mask.flat[fails[:2]] = 1
    mask.flat[fails[2]] = IGNORE_LABEL
    mask.flat[np.flatnonzero(die == PASS)[:3]] = 2  # pass dies: not counted whatever they hold
    assert taught_dies([die], [mask]) == {"background": 2, "pattern": 2, "ignored": 1}


class _Constant(torch.nn.Module):
    """A 'model' whose logits say class ``cls`` everywhere, strongly."""

    def __init__(self, cls: int) -> None:
        super().__init__()
        self.cls = cls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], len(CLASSES), *x.shape[2:])
        logits[:, self.cls] = 10.0
        return logits


def test_pseudo_mask_table_keeps_mixes_and_masks_by_label() -> None:
    t = _table(["Center+Scratch", "Edge-Ring", "None", "Near-full"])
    weak, report = pseudo_mask_table(t, _Constant(2), class_names=CLASSES, min_prob=0.6)  # says scratch
    assert weak.column("wafer_id").to_pylist() == ["w0", "w1", "w2"]
    assert report.kept == {"scratch+circle": 1, "ring": 1, "none": 1}  # class-id order and report.dropped == {"Near-full": 1}
    (mix, ring, none) = label_maps(weak)
    assert (mix[_die(1) == FAIL] == 2).all()  # scratch is in Center+Scratch
    assert (ring[_die(2) == FAIL] == IGNORE_LABEL).all()  # scratch is not in Edge-Ring
    assert (none[_die(3) == FAIL] == 0).all()
    assert report.dies == {"background": 3, "pattern": 1, "ignored": 2}
    seeded, _ = pseudo_mask_table(t, _Constant(1), class_names=CLASSES, min_prob=0.6,  # says ring, scratch at 4.5e-5
                                  line_seed=LineSeed(SCRATCH, 1e-5, 1.0, 1))
    (mix, ring, none) = label_maps(seeded)
    assert (mix[_die(1) == FAIL] == SCRATCH).all() and (ring[_die(2) == FAIL] == 1).all()  # seeds: the scratch wafer
    # the public contract still refuses 255 in a user's table
    assert validate_table(weak, n_classes=len(CLASSES)).n_quarantined == 1


# -- wafer_label_table: rows for the wafer-level loss (weak_labels: wafer_labels) --------------------
def _sized_table(labels: list[str | None], sides: list[int]):
    """Wafer i: a sides[i] x sides[i] map with i + 1 fail dies, its dataset label labels[i]."""
    maps = []
    for i, side in enumerate(sides):
        die = np.full((side, side), PASS, np.uint8)
        die[0, 0] = NO_DIE
        die.flat[1:2 + i] = FAIL
        maps.append(die)
    return make_table(wafer_ids=[f"w{i}" for i in range(len(labels))], die_maps=maps, wafer_labels=labels,
                      label_maps=[np.zeros(m.shape, np.uint8) for m in maps])


def test_wafer_label_table_keeps_mixes_and_drops_what_says_nothing() -> None:
    labels = ["Edge-Ring", "Center+Scratch", "Near-full", None, "None", "Random+Scratch", "", "Donut+Edge-Ring",
              "Near-full+Scratch"]
    t = _sized_table(labels, [6] * len(labels))
    kept, report = wafer_label_table(t, class_names=CLASSES)
    assert kept.column("wafer_id").to_pylist() == ["w0", "w1", "w4", "w5", "w7"]
    assert report.kept == {"ring": 2, "scratch+circle": 1, "none": 1, "scratch": 1}
    assert report.dropped == {"Near-full": 1, UNLABELLED: 2, "Near-full+Scratch": 1}
    # label_map is null on every row (the input had zero maps): the loss reads only the wafer label
    assert kept.column("label_map").null_count == kept.num_rows == 5
    assert kept.column("wafer_label").to_pylist() == [labels[i] for i in (0, 1, 4, 5, 7)]
    assert kept.column("die_map").to_pylist() == [t.column("die_map")[i].as_py() for i in (0, 1, 4, 5, 7)]
    assert validate_table(kept, n_classes=len(CLASSES)).valid.num_rows == 5  # still a valid wafer table


def test_wafer_label_table_drops_maps_over_the_side_limit_and_counts_them() -> None:
    labels = ["Edge-Ring", "Scratch", "Near-full", "None", "Loc", None]
    sides = [6, 12, 12, 8, 9, 20]  # w1 and w4 are too big; w2 and w5 are dropped for their label
    kept, report = wafer_label_table(_sized_table(labels, sides), class_names=CLASSES, max_map_side=8)
    assert kept.column("wafer_id").to_pylist() == ["w0", "w3"]  # side 8 is not over 8
    assert report.dropped == {"Near-full": 1, UNLABELLED: 1, "over 8 dies a side": 2}
    assert report.kept == {"ring": 1, "none": 1}
    everything, open_report = wafer_label_table(_sized_table(labels, sides), class_names=CLASSES)
    assert everything.num_rows == 4 and not any(k.startswith("over") for k in open_report.dropped)
    # a map only wider than the limit counts too
    wide = make_table(wafer_ids=["a", "b"], wafer_labels=["Scratch", "Scratch"],
                      die_maps=[np.full((4, 10), FAIL, np.uint8), np.full((8, 4), FAIL, np.uint8)])
    kept, report = wafer_label_table(wide, class_names=CLASSES, max_map_side=8)
    assert kept.column("wafer_id").to_pylist() == ["b"] and report.dropped == {"over 8 dies a side": 1}


def test_wafer_label_table_caps_each_pattern_set_with_a_seeded_sample() -> None:
    labels = ["None"] * 12 + ["Center+Scratch"] * 6 + ["Edge-Ring"] * 2
    t = _sized_table(labels, [6] * len(labels))
    a, report = wafer_label_table(t, class_names=CLASSES, max_per_class=4, seed=3)
    b, _ = wafer_label_table(t, class_names=CLASSES, max_per_class=4, seed=3)
    assert report.kept == {"none": 4, "scratch+circle": 4, "ring": 2}
    ids = a.column("wafer_id").to_pylist()
    assert ids == b.column("wafer_id").to_pylist() and len(ids) == 10
    assert ids == sorted(ids, key=lambda x: int(x[1:]))  # table order kept
    assert {"w18", "w19"} <= set(ids)  # a set under the cap is kept whole
    labels_kept = a.column("wafer_label").to_pylist()
    assert labels_kept.count("None") == 4 and labels_kept.count("Center+Scratch") == 4
    seeds = {tuple(wafer_label_table(t, class_names=CLASSES, max_per_class=4, seed=s)[0].column("wafer_id").to_pylist())
             for s in range(5)}
    assert len(seeds) > 1  # the sample depends on the seed


def test_random_wafers_are_capped_as_a_group_of_their_own() -> None:
    """None and Random both mean 'no pattern', but Random wafers (dense random fails) are 1 in 45 of
    them in WM-811K: capped together, a sample of None wafers would hold almost none."""
    labels = ["None"] * 10 + ["Random"] * 3 + ["random"] + ["Random+Scratch", "Edge-Ring"]
    t = _sized_table(labels, [6] * len(labels))
    for build in (lambda: wafer_label_table(t, class_names=CLASSES, max_per_class=4, seed=1),
                  lambda: pseudo_mask_table(t, torch.nn.Conv2d(3, len(CLASSES), 1), class_names=CLASSES,
                                            min_prob=0.5, max_per_class=4, seed=1)):
        kept, report = build()
        assert report.kept == {"none": 4, "random": 4, "scratch": 1, "ring": 1}  # Random+Scratch is a scratch
        kept_labels = kept.column("wafer_label").to_pylist()
        assert kept_labels.count("None") == 4 and sum(x.lower() == "random" for x in kept_labels) == 4


def test_wafer_label_table_checks_its_input() -> None:
    with pytest.raises(ValueError, match="wafer_label column"):
        wafer_label_table(_table(["Scratch"]).drop_columns(["wafer_label"]), class_names=CLASSES)
    with pytest.raises(ValueError, match="not configured classes"):
        wafer_label_table(_table(["Center+Scratch"]), class_names=["background", "ring", "scratch"])
