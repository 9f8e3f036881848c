"""Wafer-level verdicts, dataset label mapping and verdict scores (hand-computed examples)."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest

from fcn_core.config import DEFAULT_CLASSES, VerdictConfig
from fcn_core.verdicts import (
    LABEL_MAP,
    clear_absent_patterns,
    follow_patterns,
    kept_classes,
    UNLABELLED,
    calibrate_verdict,
    calibrate_verdict_joint,
    calibrate_verdict_multilabel,
    count_fail_dies,
    die_metrics,
    die_purity,
    false_alarm_share,
    multilabel_metrics,
    multilabel_scores,
    parse_patterns,
    patterns_strings,
    dataset_label_patterns,
    map_dataset_label,
    dies_column,
    miss_examples,
    real_eval_report,
    shaped_maps,
    verdict_labels,
    verdict_scores,
    verdicts_from_counts,
    wafer_verdicts,
)

CLASSES = [c.name for c in DEFAULT_CLASSES]  # background, ring, scratch, local zone, circle
LABELS = verdict_labels(CLASSES)


def counts(*rows: list[int]) -> np.ndarray:
    return np.array(rows, dtype=np.int64)


# -- verdicts ------------------------------------------------------------------------------------
def test_verdict_labels_put_none_first() -> None:
    assert LABELS == ["none", "ring", "scratch", "local zone", "circle"]


def test_min_dies_threshold_is_inclusive() -> None:
    v = verdicts_from_counts(counts([0, 3, 0, 0, 0], [0, 2, 0, 0, 0]), class_names=CLASSES,
                             verdict=VerdictConfig(min_dies=3, min_share=0.0))
    assert v.dominant_pattern == ["ring", "none"]
    assert v.patterns_present == [["ring"], []]
    assert v.dominant_share.tolist() == [1.0, 0.0]


def test_min_share_threshold_is_inclusive() -> None:
    # 3 of 60 fail dies is exactly 5 %; 3 of 61 is just under
    v = verdicts_from_counts(counts([57, 0, 3, 0, 0], [58, 0, 3, 0, 0]), class_names=CLASSES,
                             verdict=VerdictConfig(min_dies=1, min_share=0.05))
    assert v.dominant_pattern == ["scratch", "none"]
    assert v.dominant_share[0] == pytest.approx(0.05)


def test_no_fail_dies_means_none() -> None:
    v = verdicts_from_counts(counts([0, 0, 0, 0, 0]), class_names=CLASSES,
                             verdict=VerdictConfig(min_dies=1, min_share=0.0))
    assert (v.dominant_pattern, v.patterns_present, v.fail_dies.tolist()) == (["none"], [[]], [0])
    assert v.dominant_share.tolist() == [0.0]


def test_background_dies_do_not_win_but_dilute_the_share() -> None:
    # 100 fail dies no pattern claims: 4 ring dies are 4 %, under the 5 % share
    v = verdicts_from_counts(counts([96, 4, 0, 0, 0]), class_names=CLASSES, verdict=VerdictConfig())
    assert v.dominant_pattern == ["none"]


def test_ties_go_to_the_lower_class_id_and_present_is_ranked_by_dies() -> None:
    v = verdicts_from_counts(counts([0, 5, 5, 0, 9], [0, 0, 6, 6, 0], [0, 4, 0, 7, 7]), class_names=CLASSES,
                             verdict=VerdictConfig(min_dies=3, min_share=0.0))
    assert v.dominant_pattern == ["circle", "scratch", "local zone"]
    assert v.patterns_present == [["circle", "ring", "scratch"], ["scratch", "local zone"],
                                  ["local zone", "circle", "ring"]]
    assert v[0].dominant_share == pytest.approx(9 / 19)
    assert v[0].dies == {"background": 0, "ring": 5, "scratch": 5, "local zone": 0, "circle": 9}
    assert [r.dominant_pattern for r in v] == v.dominant_pattern and len(v.rows()) == 3


def test_wafer_verdicts_count_only_fail_dies() -> None:
    die = np.array([[0, 1, 2, 2],
                    [1, 2, 2, 2],
                    [0, 2, 1, 0]], dtype=np.uint8)
    pred = np.array([[1, 1, 1, 1],  # off-wafer and pass predictions must not count
                     [2, 1, 1, 0],
                     [4, 3, 3, 4]], dtype=np.uint8)
    empty = np.zeros((2, 2), np.uint8)
    raw = wafer_verdicts([pred, empty], [die, np.ones((2, 2), np.uint8)], class_names=CLASSES,
                         verdict=VerdictConfig(min_dies=2, min_share=0.3, dies_follow_patterns=False))
    assert raw.dies.tolist() == [[1, 4, 0, 1, 0], [0, 0, 0, 0, 0]]
    v = wafer_verdicts([pred, empty], [die, np.ones((2, 2), np.uint8)], class_names=CLASSES,
                       verdict=VerdictConfig(min_dies=2, min_share=0.3))
    assert v.dies.tolist() == [[2, 4, 0, 0, 0], [0, 0, 0, 0, 0]]  # one local-zone die is no local zone
    assert v.fail_dies.tolist() == [6, 0]
    assert v.dominant_pattern == ["ring", "none"]
    assert v.to_pandas().columns.tolist() == [
        "dies_background", "dies_ring", "dies_scratch", "dies_local_zone", "dies_circle",
        "fail_dies", "dominant_pattern", "dominant_share", "patterns", "patterns_present"]
    assert v.patterns == ["ring", "none"]


def test_vectorised_counts_match_a_plain_loop() -> None:
    rng = np.random.default_rng(3)
    dies, preds = [], []
    for _ in range(40):
        h, w = rng.integers(1, 30, size=2)
        dies.append(rng.integers(0, 3, size=(h, w)).astype(np.uint8))
        preds.append(rng.integers(0, 5, size=(h, w)).astype(np.uint8))
    want = np.array([[int(((d == 2) & (p == k)).sum()) for k in range(5)] for d, p in zip(dies, preds)])
    np.testing.assert_array_equal(count_fail_dies(preds, dies, n_classes=5), want)
    assert count_fail_dies([], [], n_classes=5).shape == (0, 5)
    # the same maps as flat buffers (a table column's layout) count the same
    flat = count_fail_dies(np.concatenate([p.ravel() for p in preds]), np.concatenate([d.ravel() for d in dies]),
                           n_classes=5, sizes=[d.size for d in dies])
    np.testing.assert_array_equal(flat, want)
    with pytest.raises(ValueError, match="do not hold maps"):
        count_fail_dies(preds[0].ravel(), dies[0].ravel(), n_classes=5, sizes=[dies[0].size + 1])


def test_one_column_name_per_class() -> None:
    assert dies_column("local zone") == dies_column("Local-Zone") == dies_column(" local-zone ") == "dies_local_zone"
    names = ["background", "ring", "Local-Zone"]
    v = verdicts_from_counts(counts([1, 2, 3]), class_names=names, verdict=VerdictConfig(min_dies=1))
    assert list(v.columns())[:3] == ["dies_background", "dies_ring", "dies_local_zone"]
    assert v.dominant_pattern == ["Local-Zone"]


def test_verdict_inputs_are_checked() -> None:
    d = np.full((2, 2), 2, np.uint8)
    with pytest.raises(ValueError, match="class ids on fail dies must lie in 0..4, found 0..255"):
        wafer_verdicts([np.array([[0, 1], [2, 255]], np.uint8)], [d], class_names=CLASSES, verdict=VerdictConfig())
    with pytest.raises(ValueError, match=r"wafer 0: prediction \(2, 3\) and die map \(2, 2\)"):
        wafer_verdicts([np.zeros((2, 3), np.uint8)], [d], class_names=CLASSES, verdict=VerdictConfig())
    with pytest.raises(ValueError, match="2 prediction maps but 1 die maps"):
        wafer_verdicts([d, d], [d], class_names=CLASSES, verdict=VerdictConfig())
    with pytest.raises(ValueError, match=r"expected \(N, 5\)"):
        verdicts_from_counts(np.zeros((2, 4)), class_names=CLASSES, verdict=VerdictConfig())


# -- label mapping ------------------------------------------------------------------------------------
@pytest.mark.parametrize("label, pattern", [
    ("Center", "circle"), ("Donut", "ring"), ("Edge-Ring", "ring"), ("Edge-Loc", "local zone"),
    ("Loc", "local zone"), ("Scratch", "scratch"), ("None", "none"), ("none", "none"), ("Random", "none"),
    ("Near-full", None), (None, None), ("", None),
    ("Donut+Edge-Ring", "ring"),  # both parts are rings
    ("Random+Scratch", "scratch"),  # a 'none' part does not hide a pattern
    ("Center+Scratch", None),  # two different patterns: no single dominant truth
    ("Edge-Loc+Near-full", None),
])
def test_map_dataset_label(label: str | None, pattern: str | None) -> None:
    assert map_dataset_label(label) == pattern


def test_label_map_targets_are_class_names_and_unknown_labels_raise() -> None:
    assert {v for v in LABEL_MAP.values() if v} <= set(LABELS)
    assert dataset_label_patterns("Center+Loc+Random") == {"circle", "local zone"}
    with pytest.raises(ValueError, match="unknown dataset label 'Spiral'"):
        map_dataset_label("Center+Spiral")


@pytest.mark.parametrize("table", ["wm811k-val.parquet", "wm811k-train.parquet", "mixedwm38-val.parquet",
                                   "mixedwm38-train.parquet"])
def test_label_map_covers_every_label_of_the_real_sets(table) -> None:
    import pyarrow.parquet as pq

    from conftest import require_real_maps

    labels = pq.read_table(require_real_maps(table), columns=["wafer_label"]).column("wafer_label").to_pylist()
    patterns = [dataset_label_patterns(x) for x in labels]  # raises on any label the map does not know
    assert sum(p is None for p in patterns) == sum("near-full" in x.lower() for x in labels)
    assert set().union(*(p for p in patterns if p)) == set(LABELS)


# -- scores ------------------------------------------------------------------------------------------
def test_verdict_scores_hand_computed() -> None:
    true = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "a"]
    s = verdict_scores(true, pred, labels=["a", "b", "c"])
    assert s["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert s["accuracy"] == pytest.approx(3 / 5)
    a, b, c = (s["per_label"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["f1"]) == pytest.approx((1 / 2, 1 / 2, 1 / 2))
    assert (b["precision"], b["recall"], b["f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert (c["precision"], c["recall"], c["f1"], c["support"], c["predicted"]) == (0.0, 0.0, 0.0, 1, 0)
    assert s["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert s["n"] == 5 and s["labels"] == ["a", "b", "c"]


def _hand_written_scores(true: list[str], pred: list[str], labels: list[str]) -> dict:
    """The project's own formulas before sklearn took over (the reference the new numbers must match)."""
    index = {name: i for i, name in enumerate(labels)}
    k = len(labels)
    t = np.array([index[x] for x in true], np.int64)
    p = np.array([index[x] for x in pred], np.int64)
    cm = np.bincount(t * k + p, minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    return {"cm": cm, "precision": precision, "recall": recall, "f1": f1, "support": support,
            "predicted": predicted, "accuracy": tp.sum() / len(true)}


def test_sklearn_scores_are_the_hand_written_ones() -> None:
    rng = np.random.default_rng(7)
    for _ in range(60):
        n = int(rng.integers(1, 300))
        true = rng.choice(LABELS, n).tolist()
        pred = [t if rng.random() < 0.6 else str(rng.choice(LABELS)) for t in true]
        want, got = _hand_written_scores(true, pred, LABELS), verdict_scores(true, pred, labels=LABELS)
        assert got["confusion"] == want["cm"].tolist() and got["accuracy"] == want["accuracy"]
        per = got["per_label"]
        for i, name in enumerate(LABELS):
            assert (per[name]["precision"], per[name]["recall"]) == (want["precision"][i], want["recall"][i])
            assert (per[name]["support"], per[name]["predicted"]) == (want["support"][i], want["predicted"][i])
            # sklearn computes F1 as 2tp / (support + predicted): the same number up to the last bit
            assert per[name]["f1"] == pytest.approx(want["f1"][i], rel=1e-15, abs=1e-15)
        assert got["macro_f1"] == pytest.approx(want["f1"].mean(), rel=1e-15, abs=1e-15)
    assert verdict_scores([], [], labels=LABELS)["macro_f1"] == 0.0


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_the_calibration_objective_is_the_macro_f1_of_the_verdicts(seed: int) -> None:
    """The search scores candidates in numpy; each score must be what the verdicts themselves score
    (verdicts_from_counts, then sklearn's and the hand-written macro-F1), ties and empty labels included."""
    from fcn_core.verdicts import _single_label_objective

    rng = np.random.default_rng(seed)
    dies = rng.integers(0, 12, size=(150, len(CLASSES)))  # small counts: many ties between patterns
    dies[:10, 1:] = 0  # wafers without pattern dies
    labels = rng.choice(["None", "Edge-Ring", "Scratch", "Loc", "Center", "Near-full", "Random"], 150).tolist()
    labels[3] = None  # unlabelled: left out, like Near-full
    objective = _single_label_objective(dies, labels, CLASSES)
    keep = [i for i, x in enumerate(labels) if map_dataset_label(x) is not None]
    true = [map_dataset_label(labels[i]) for i in keep]
    for md, ms in [(1, 0.0), (3, 0.05), (5, 0.1), (8, 0.2), (20, 0.5), (40, 0.9)]:
        by_class = {name: int(rng.integers(1, 10)) for name in CLASSES[1:] if rng.random() < 0.5}
        candidate = VerdictConfig(min_dies=md, min_share=ms, min_dies_by_class=by_class)
        pred = verdicts_from_counts(dies[keep], class_names=CLASSES, verdict=candidate).dominant_pattern
        want = verdict_scores(true, pred, labels=LABELS)["macro_f1"]
        assert objective(candidate) == pytest.approx(want, rel=1e-12, abs=1e-15)
        assert want == pytest.approx(float(_hand_written_scores(true, pred, LABELS)["f1"].mean()), rel=1e-12)


def test_verdict_scores_perfect_and_unseen_label() -> None:
    s = verdict_scores(["x", "y"], ["x", "y"], labels=["x", "y", "z"])
    assert s["accuracy"] == 1.0
    assert s["macro_f1"] == pytest.approx(2 / 3)  # z never seen nor predicted counts as 0
    with pytest.raises(ValueError, match=r"labels \['q'\] are not among"):
        verdict_scores(["x"], ["q"], labels=["x", "y"])
    with pytest.raises(ValueError, match="2 true labels but 1 predictions"):
        verdict_scores(["x", "y"], ["x"], labels=["x", "y"])


def test_real_eval_report_maps_excludes_and_tabulates() -> None:
    raw = ["Edge-Ring", "Donut", "Center", "Near-full", "None", "Random", "Scratch", "Loc", "Edge-Loc", None]
    pred = ["ring", "none", "circle", "ring", "none", "scratch", "scratch", "local zone", "ring", "none"]
    r = real_eval_report(raw, pred, labels=LABELS)
    assert r.excluded == {"Near-full": 1, UNLABELLED: 1}
    assert r.scores["n"] == 8
    assert r.scores["accuracy"] == pytest.approx(5 / 8)
    assert r.confusion.loc["ring", "none"] == 1 and r.confusion.loc["none", "scratch"] == 1
    assert r.by_dataset_label.loc["Donut", "hit_rate"] == 0.0
    assert r.by_dataset_label.loc["Edge-Ring", "hit_rate"] == 1.0
    assert r.table["label"].tolist() == [*LABELS, "accuracy", "macro avg"]
    macro = r.table.set_index("label").loc["macro avg", "f1"]
    assert macro == pytest.approx(r.scores["macro_f1"])
    assert f"{r.scores['macro_f1']:.3f}" in r.markdown and "| local zone |" in r.markdown
    m = r.metrics()
    assert m["real_accuracy"] == pytest.approx(5 / 8) and "real_recall_local_zone" in m
    pd.testing.assert_frame_equal(pd.read_csv(pd.io.common.StringIO(r.table.to_csv(index=False))), r.table,
                                  check_dtype=False)


def test_real_eval_report_needs_matching_class_names() -> None:
    with pytest.raises(ValueError, match=r"LABEL_MAP targets \['circle'\]"):
        real_eval_report(["Center"], ["none"], labels=["none", "ring", "scratch", "local zone", "blob"])


def test_miss_examples_rank_confusions() -> None:
    true = ["ring", "ring", "ring", "circle", None, "none"]
    pred = ["none", "none", "ring", "ring", "ring", "none"]
    out = miss_examples(true, pred, per_pair=1)
    assert out[0][:2] == ("ring", "none") and out[0][2][0] in (0, 1)
    assert out[1] == ("circle", "ring", [3])
    assert len(out) == 2


# -- calibration ----------------------------------------------------------------------------------
def test_calibration_picks_the_thresholds_with_the_best_macro_f1() -> None:
    # wafers 0-3 are 'None' maps with 4 stray scratch dies each; wafers 4-5 are true scratches (20 dies)
    dies = counts(*[[40, 0, 4, 0, 0]] * 4, [10, 0, 20, 0, 0], [12, 0, 20, 0, 0])
    labels = ["None"] * 4 + ["Scratch"] * 2
    loose = VerdictConfig(min_dies=3, min_share=0.05)
    assert verdicts_from_counts(dies, class_names=CLASSES, verdict=loose).dominant_pattern[:4] == ["scratch"] * 4
    best, f1 = calibrate_verdict(dies, labels, class_names=CLASSES, source="part.parquet",
                                 min_dies=(3, 5, 8), min_share=(0.05,))
    assert (best.min_dies, best.min_share, best.calibrated_on) == (5, 0.05, "part.parquet")  # 5 and 8 tie: smaller
    assert calibrate_verdict(dies, labels, class_names=CLASSES, source="p", min_dies=(3,),
                             min_share=(0.05, 0.5, 0.6))[0].min_share == 0.5
    verdicts = verdicts_from_counts(dies, class_names=CLASSES, verdict=best)
    assert verdicts.dominant_pattern == ["none"] * 4 + ["scratch"] * 2
    assert f1 == pytest.approx(real_eval_report(labels, verdicts.dominant_pattern, labels=LABELS).scores["macro_f1"])


def test_per_pattern_thresholds_override_the_shared_ones() -> None:
    dies = counts([10, 4, 0, 0, 0], [10, 0, 4, 0, 0])
    v = VerdictConfig(min_dies=3, min_dies_by_class={"scratch": 5}, min_share_by_class={"ring": 0.5})
    assert verdicts_from_counts(dies, class_names=CLASSES, verdict=v).dominant_pattern == ["none", "none"]
    assert v.describe() == ("min_dies 3, min_share 0.05; per pattern (min_dies, min_share): "
                            "ring (3, 0.5), scratch (5, 0.05)")
    with pytest.raises(ValueError, match="unknown patterns"):
        verdicts_from_counts(dies, class_names=CLASSES, verdict=VerdictConfig(min_dies_by_class={"donut": 2}))


def test_calibration_retunes_one_pattern_when_one_pair_cannot_fit_all() -> None:
    # rings show only 4 dies; 'None' wafers carry 6 stray scratch dies; true scratches have 20
    dies = counts(*[[30, 4, 0, 0, 0]] * 3, *[[30, 0, 6, 0, 0]] * 3, *[[30, 0, 20, 0, 0]] * 3)
    labels = ["Edge-Ring"] * 3 + ["None"] * 3 + ["Scratch"] * 3
    shared, shared_f1 = calibrate_verdict(dies, labels, class_names=CLASSES, source="s", min_dies=(3, 8),
                                          min_share=(0.02,), per_class_sweeps=0)
    best, f1 = calibrate_verdict(dies, labels, class_names=CLASSES, source="s", min_dies=(3, 8), min_share=(0.02,))
    assert shared_f1 < f1 == pytest.approx(3 / 5)  # all right; local zone and circle never occur: F1 0
    assert best.thresholds(CLASSES[1:])[0][:2] == [3, 8]  # ring keeps 3 dies, scratch needs 8
    assert verdicts_from_counts(dies, class_names=CLASSES, verdict=best).dominant_pattern == (
        ["ring"] * 3 + ["none"] * 3 + ["scratch"] * 3)


def test_shape_rules_apply_before_counting() -> None:
    die = np.full((6, 6), 2, np.uint8)
    pred = np.zeros((6, 6), np.uint8)
    pred[0, :] = 2        # a scratch line of 6 dies
    pred[3:5, 3:5] = 2    # a 2 x 2 clump called scratch
    rule = VerdictConfig(min_dies=1, min_share=0.0, min_elongation_by_class={"scratch": 4})
    no_rule = VerdictConfig(min_dies=1, min_share=0.0)
    assert wafer_verdicts([pred], [die], class_names=CLASSES, verdict=no_rule).dies[0, 2] == 10
    assert wafer_verdicts([pred], [die], class_names=CLASSES, verdict=rule).dies[0, 2] == 6
    shaped = shaped_maps([pred], [die], class_names=CLASSES, verdict=rule)[0]
    assert (shaped[3:5, 3:5] == 0).all() and (pred[3:5, 3:5] == 2).all()
    assert shaped_maps([pred], [die], class_names=CLASSES, verdict=no_rule)[0] is pred  # no rule: no copy
    assert rule.describe().endswith("groups at least this elongated: scratch 4")
    with pytest.raises(ValueError, match="unknown patterns"):
        VerdictConfig(min_elongation_by_class={"donut": 4}).elongation_rules(CLASSES)
    with pytest.raises(ValueError, match="square group"):
        VerdictConfig(min_elongation_by_class={"scratch": 0.5})


def test_calibration_keeps_the_shape_rules_it_is_given() -> None:
    dies = counts([10, 0, 5, 0, 0], [10, 0, 0, 0, 0])
    best, _ = calibrate_verdict(dies, ["Scratch", "None"], class_names=CLASSES, source="s",
                                min_elongation_by_class={"scratch": 4.0})
    assert best.min_elongation_by_class == {"scratch": 4.0} and best.calibrated_on == "s"


# -- multi-label verdicts (issue #13) ---------------------------------------------------------------
def test_patterns_names_every_present_pattern_in_class_id_order() -> None:
    # single, mixed (circle outnumbers ring and scratch: still listed in class-id order), none
    dies = counts([10, 8, 0, 0, 0], [0, 5, 4, 0, 9], [50, 1, 2, 0, 0], [0, 0, 0, 0, 0])
    v = verdicts_from_counts(dies, class_names=CLASSES, verdict=VerdictConfig(min_dies=3, min_share=0.0))
    assert v.patterns == ["ring", "ring+scratch+circle", "none", "none"]
    assert v.dominant_pattern == ["ring", "circle", "none", "none"]  # dominant_pattern stays as it was
    assert v[1].patterns == "ring+scratch+circle" and v.columns()["patterns"] == v.patterns
    assert [sorted(parse_patterns(p)) for p in v.patterns] == [sorted(p) for p in v.patterns_present]


def test_patterns_follow_the_per_pattern_thresholds() -> None:
    # 100 fail dies: ring 6 (6 %), scratch 4 (4 %), local zone 12 (12 %)
    dies = counts([78, 6, 4, 12, 0])
    v = VerdictConfig(min_dies=5, min_share=0.05, min_dies_by_class={"scratch": 3},
                      min_share_by_class={"local zone": 0.15, "scratch": 0.04})
    assert verdicts_from_counts(dies, class_names=CLASSES, verdict=v).patterns == ["ring+scratch"]
    stricter = v.model_copy(update={"min_share_by_class": {"local zone": 0.12, "scratch": 0.041}})
    assert verdicts_from_counts(dies, class_names=CLASSES, verdict=stricter).patterns == ["ring+local zone"]


def test_patterns_agree_with_the_die_columns_and_thresholds_on_random_counts() -> None:
    rng = np.random.default_rng(13)
    dies = rng.integers(0, 30, size=(300, len(CLASSES))) * (rng.random((300, len(CLASSES))) < 0.5)
    cfg = VerdictConfig(min_dies=5, min_share=0.1, min_dies_by_class={"scratch": 3})
    table = verdicts_from_counts(dies, class_names=CLASSES, verdict=cfg).to_pandas()
    md, ms = cfg.thresholds(CLASSES[1:])
    for _, row in table.iterrows():
        want = [n for n, d, s in zip(CLASSES[1:], md, ms)
                if row[dies_column(n)] >= d and row[dies_column(n)] >= s * max(row["fail_dies"], 1)]
        assert row["patterns"] == ("+".join(want) or "none")
    assert {"none", "ring"} <= set(table["patterns"]) and table["patterns"].str.count(r"\+").max() >= 2


def test_patterns_strings_checks_its_matrix() -> None:
    assert patterns_strings(np.zeros((0, 4), bool), CLASSES[1:]) == []
    with pytest.raises(ValueError, match="expected"):
        patterns_strings(np.zeros((2, 3), bool), CLASSES[1:])
    with pytest.raises(ValueError, match="must not contain"):
        patterns_strings(np.zeros((1, 2), bool), ["ring", "ring+scratch"])


# -- multi-label scores ---------------------------------------------------------------------------------
def test_multilabel_scores_by_hand() -> None:
    labels = ["Center+Scratch", "Donut+Edge-Ring", "Edge-Loc+Loc+Scratch", "None", "Near-full", "Edge-Ring"]
    pred = ["circle", "ring", "scratch+local zone", "ring", "none", "ring+scratch"]
    s = multilabel_scores(labels, pred, pattern_names=CLASSES[1:])
    assert s["n"] == 5 and s["excluded"] == {"Near-full": 1}
    # exact: wafers 1 (ring) and 2 (local zone+scratch); wafer 0 misses scratch, 3 and 5 add patterns
    assert s["exact_match"] == pytest.approx(2 / 5)
    per = s["per_pattern"]
    # ring: true on 1, 5; predicted on 1, 3, 5 -> tp 2 fp 1 fn 0
    assert (per["ring"]["precision"], per["ring"]["recall"]) == (pytest.approx(2 / 3), 1.0)
    assert per["ring"]["f1"] == pytest.approx(0.8) and per["ring"]["support"] == 2
    # scratch: true on 0, 2; predicted on 2, 5 -> tp 1 fp 1 fn 1
    assert per["scratch"]["f1"] == pytest.approx(0.5)
    assert per["local zone"]["f1"] == 1.0 and per["circle"]["f1"] == 1.0
    assert s["macro_f1"] == pytest.approx((0.8 + 0.5 + 1 + 1) / 4)
    m = multilabel_metrics(s)
    assert m["mixed_exact_match"] == pytest.approx(0.4) and m["mixed_f1_local_zone"] == 1.0
    with pytest.raises(ValueError, match="not among"):
        multilabel_scores(["Center"], ["blob"], pattern_names=CLASSES[1:])
    with pytest.raises(ValueError, match="2 dataset labels but 1"):
        multilabel_scores(["Center", "Loc"], ["circle"], pattern_names=CLASSES[1:])


def test_die_purity_and_false_alarm_share_by_hand() -> None:
    # columns: background, ring, scratch, local zone, circle
    dies = counts([5, 9, 0, 1, 0],    # Edge-Ring: 9 of 10 pattern dies are ring
                  [2, 10, 0, 0, 0],   # Donut: 10 of 10
                  [0, 3, 0, 1, 0],    # Loc: 1 of 4
                  [7, 0, 0, 0, 0],    # Loc: no pattern die, adds nothing
                  [90, 2, 0, 0, 0],   # None: 2 of 92 fail dies given a pattern
                  [50, 0, 0, 0, 8],   # Random: 8 of 58
                  [9, 9, 9, 9, 9])    # Near-full: left out of both
    labels = ["Edge-Ring", "Donut", "Loc", "Loc", "None", "Random", "Near-full"]
    p = die_purity(dies, labels, class_names=CLASSES)
    assert p["purity"] == pytest.approx(20 / 24) and (p["pattern_dies"], p["wafers"]) == (24, 4)
    assert p["by_label"]["Loc"] == {"purity": 0.25, "pattern_dies": 4, "wafers": 2}
    assert p["by_label"]["Edge-Ring"]["purity"] == pytest.approx(0.9)
    f = false_alarm_share(dies, labels, class_names=CLASSES)
    assert f["share"] == pytest.approx(10 / 150) and (f["fail_dies"], f["wafers"]) == (150, 2)
    assert f["by_label"]["Random"]["share"] == pytest.approx(8 / 58)
    assert f["wafers_with_pattern_dies"] == 1.0
    m = die_metrics(p, f)
    assert m["real_die_purity_edge_ring"] == pytest.approx(0.9) and m["real_false_alarm_share"] == f["share"]
    assert np.isnan(die_purity(dies[4:6], labels[4:6], class_names=CLASSES)["purity"])  # no pattern wafer
    with pytest.raises(ValueError, match="one row per dataset label"):
        die_purity(dies[:2], labels, class_names=CLASSES)


def test_multilabel_calibration_picks_per_pattern_thresholds() -> None:
    # ring wafers show 4 ring dies; 'None' wafers carry 6 stray scratch dies; true scratches 20
    dies = counts(*[[30, 4, 0, 0, 0]] * 3, *[[30, 0, 6, 0, 0]] * 3, *[[30, 4, 20, 0, 0]] * 3)
    labels = ["Edge-Ring"] * 3 + ["None"] * 3 + ["Edge-Ring+Scratch"] * 3
    shared, shared_f1 = calibrate_verdict_multilabel(dies, labels, class_names=CLASSES, source="s",
                                                     min_dies=(3, 8), min_share=(0.02,), per_class_sweeps=0)
    # one pair for all: 3 dies keeps the rings but flags the stray scratches (scratch F1 3/4.5), 8 drops
    # the rings (F1 0, scratch 1): 3 wins with (1 + 2/3) / 4 over (0 + 1) / 4
    assert shared.min_dies == 3 and shared_f1 == pytest.approx((1 + 2 / 3) / 4)
    best, f1 = calibrate_verdict_multilabel(dies, labels, class_names=CLASSES, source="s", min_dies=(3, 8),
                                            min_share=(0.02,))
    assert best.thresholds(CLASSES[1:])[0][:2] == [3, 8] and f1 == pytest.approx(2 / 4)
    v = verdicts_from_counts(dies, class_names=CLASSES, verdict=best)
    assert v.patterns == ["ring"] * 3 + ["none"] * 3 + ["ring+scratch"] * 3
    assert f1 == pytest.approx(multilabel_scores(labels, v.patterns, pattern_names=CLASSES[1:])["macro_f1"])
    assert best.calibrated_on == "s"


def test_dataset_labels_as_patterns_strings() -> None:
    from fcn_core.verdicts import dataset_patterns_string

    names = CLASSES[1:]
    assert dataset_patterns_string("Scratch+Center+Donut", names) == "ring+scratch+circle"
    assert dataset_patterns_string("Donut+Edge-Ring", names) == "ring"
    assert [dataset_patterns_string(x, names) for x in ("None", "Random", "Near-full", None)] == [
        "none", "none", None, None]
    assert miss_examples([dataset_patterns_string("Center+Loc", names)], ["circle"]) == [
        ("local zone+circle", "circle", [0])]


# -- joint calibration: one set of thresholds for WM-811K-like and MixedWM38-like wafers -------------
def _joint_objective(verdict: VerdictConfig, single: tuple, mixed: tuple) -> float:
    """The mean of the single-label macro-F1 of dominant_pattern and the multi-label macro-F1 of patterns,
    recomputed from the public scores."""
    single_v = verdicts_from_counts(single[0], class_names=CLASSES, verdict=verdict)
    mixed_v = verdicts_from_counts(mixed[0], class_names=CLASSES, verdict=verdict)
    first = real_eval_report(single[1], single_v.dominant_pattern, labels=LABELS).scores["macro_f1"]
    second = multilabel_scores(mixed[1], mixed_v.patterns, pattern_names=CLASSES[1:])["macro_f1"]
    return 0.5 * (first + second)


def test_joint_calibration_compromises_between_the_two_optima() -> None:
    # WM-811K-like: scratches show only 3 to 5 scratch dies, so the single-label optimum keeps 3
    single = (counts(*[[30, 4, 0, 0, 0]] * 3, [30, 0, 3, 0, 0], *[[30, 0, 5, 0, 0]] * 3, *[[30, 0, 0, 0, 0]] * 3),
              ["Edge-Ring"] * 3 + ["Scratch"] * 4 + ["None"] * 3)
    # MixedWM38-like: 'None' wafers carry 4 or 6 stray scratch dies, true mixes 20: the optimum is 8
    mixed = (counts(*[[30, 0, 4, 0, 0]] * 3, [30, 0, 6, 0, 0], *[[30, 4, 20, 0, 0]] * 3, *[[30, 4, 0, 0, 0]] * 2),
             ["None"] * 4 + ["Edge-Ring+Scratch"] * 3 + ["Edge-Ring"] * 2)
    grid = dict(class_names=CLASSES, min_dies=(3, 5, 8), min_share=(0.02,))
    alone, _ = calibrate_verdict(*single, source="s", **grid)
    multi, _ = calibrate_verdict_multilabel(*mixed, source="s", **grid)
    joint, f1 = calibrate_verdict_joint(single, mixed, source="both", min_elongation_by_class={"scratch": 4.0},
                                        **grid)
    scratch = lambda v: v.thresholds(CLASSES[1:])[0][1]  # noqa: E731
    assert (scratch(alone), scratch(multi), scratch(joint)) == (3, 8, 5)
    assert joint.thresholds(CLASSES[1:])[0][0] == 3  # rings keep their 4 dies everywhere
    # by hand: at 5 the single-label F1 is (none 6/7 + ring 1 + scratch 6/7) / 5 = 19/35 and the mixed one
    # (ring 1 + scratch 6/7) / 4 = 13/28; at 3 they are 3/5 and 2/5, at 8 they are 8/25 and 1/2
    assert f1 == pytest.approx(0.5 * (19 / 35 + 13 / 28), rel=1e-12)
    assert f1 == pytest.approx(_joint_objective(joint, single, mixed), rel=1e-12)
    assert f1 > _joint_objective(alone, single, mixed) and f1 > _joint_objective(multi, single, mixed)
    assert joint.calibrated_on == "both" and joint.min_elongation_by_class == {"scratch": 4.0}


def test_joint_calibration_score_is_the_mean_of_both_scores_at_its_thresholds() -> None:
    rng = np.random.default_rng(8)
    single = (rng.integers(0, 25, size=(80, len(CLASSES))),
              rng.choice(["None", "Edge-Ring", "Scratch", "Loc", "Center", "Near-full", "Center+Loc"], 80).tolist())
    mixed = (rng.integers(0, 25, size=(60, len(CLASSES))),
             rng.choice(["None", "Edge-Ring+Scratch", "Center+Loc+Scratch", "Donut", "Near-full", "Random"],
                        60).tolist())
    joint, f1 = calibrate_verdict_joint(single, mixed, class_names=CLASSES, source="s")
    assert 0.0 < f1 <= 1.0
    assert f1 == pytest.approx(_joint_objective(joint, single, mixed), rel=1e-12)
    # the search starts from the best shared pair, so it ends at least as well as any shared pair does
    for md in (3, 8, 20):
        shared = VerdictConfig(min_dies=md, min_share=0.05)
        assert f1 >= _joint_objective(shared, single, mixed) - 1e-12


# -- dies follow patterns: a map shows only the patterns its wafer's verdict finds ----------------------
def test_follow_patterns_clears_the_dies_of_patterns_too_small_to_count() -> None:
    die = np.full((4, 5), 2, np.uint8)
    die[3, 4] = 1  # a pass die
    pred = np.array([[1, 1, 1, 1, 0],   # ring: 4 dies (counts at min_dies 3)
                     [2, 2, 0, 0, 0],   # scratch: 2 dies (does not)
                     [3, 0, 0, 0, 0],   # local zone: 1 die (does not)
                     [4, 4, 4, 4, 4]], np.uint8)  # circle: 4 fail dies (and one prediction on the pass die)
    quiet = np.zeros((3, 3), np.uint8)
    verdict = VerdictConfig(min_dies=3, min_share=0.0)
    maps, dies = [pred, quiet], [die, np.full((3, 3), 2, np.uint8)]
    followed = follow_patterns(maps, dies, class_names=CLASSES, verdict=verdict)
    want = np.where(np.isin(pred, [2, 3]), 0, pred)
    assert np.array_equal(followed[0], want) and np.array_equal(followed[1], quiet)
    assert np.array_equal(pred[1, :2], [2, 2])  # not in place unless asked
    # the same on the flat buffer the predictions table is built from
    keep = kept_classes(count_fail_dies(maps, dies, n_classes=len(CLASSES)), class_names=CLASSES, verdict=verdict)
    assert keep.tolist() == [[True, True, False, False, True], [True, False, False, False, False]]
    flat = np.concatenate([m.ravel() for m in maps])
    clear_absent_patterns(flat, keep, sizes=np.array([pred.size, quiet.size]))
    assert np.array_equal(flat, np.concatenate([want.ravel(), quiet.ravel()]))
    # the verdicts are the same either way, and their dies_* count what the followed map shows
    raw = count_fail_dies(maps, dies, n_classes=len(CLASSES))
    v = verdicts_from_counts(raw, class_names=CLASSES, verdict=verdict)
    assert v.patterns == ["ring+circle", "none"]
    assert v.dies.tolist() == count_fail_dies(followed, dies, n_classes=len(CLASSES)).tolist() == [[11, 4, 0, 0, 4], [9, 0, 0, 0, 0]]
    assert verdicts_from_counts(v.dies, class_names=CLASSES, verdict=verdict).patterns == v.patterns
    # switched off: maps and counts as the network and the shape rules left them
    off = verdict.model_copy(update={"dies_follow_patterns": False})
    assert np.array_equal(follow_patterns(maps, dies, class_names=CLASSES, verdict=off)[0], pred)
    assert verdicts_from_counts(raw, class_names=CLASSES, verdict=off).dies.tolist() == raw.tolist()

