"""fcn_core.inference.products: the predictions table, built through Scorer.score_table."""
import itertools

import numpy as np
import pytest
import torch

from fakes import ConstantModel
from fcn_core.config import load_config
from fcn_core.inference.packed import packed_column, predict_maps
from fcn_core.inference.products import pass_dies
from fcn_core.models import build_fcn
from fcn_core.scorer import Scorer
from fcn_core.synth import generate_wafers
from fcn_core.table import FAIL, PASS, die_maps
from fcn_core.verdicts import dies_column


@pytest.fixture(scope="module")
def table():
    return generate_wafers(40, seed=11)


def _confident_model(seed=0):
    torch.manual_seed(seed)
    m = build_fcn("fcn8s", n_classes=5)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("score"):
                p.normal_(0, 0.2)
    return m.eval()


def test_score_table_columns_and_counts(table):
    cfg = load_config("tiny")
    out = Scorer(ConstantModel(1), cfg.verdict, cfg).score_table(table, model_name="wafer-fcn", model_version="7",
                                                                  extra={"run_id": "abc"})
    assert out.num_rows == table.num_rows
    assert out.column("wafer_id").to_pylist() == table.column("wafer_id").to_pylist()
    fails = [int((m == FAIL).sum()) for m in die_maps(table)]
    assert out.column("fail_dies").to_pylist() == fails
    assert out.column(dies_column("ring")).to_pylist() == fails
    assert out.column(dies_column("local zone")).to_pylist() == [0] * table.num_rows
    assert set(out.column("dominant_pattern").to_pylist()) <= {"ring", "none"}
    assert out.column("model_version").to_pylist() == ["7"] * table.num_rows
    assert out.column("run_id").to_pylist() == ["abc"] * table.num_rows
    passes = np.array([int((m == PASS).sum()) for m in die_maps(table)])
    np.testing.assert_allclose(out.column("yield").to_numpy(), passes / (passes + np.array(fails)))
    blob = out.column("pred_map")[0].as_py()
    h, w = table.column("height")[0].as_py(), table.column("width")[0].as_py()
    assert len(blob) == h * w


def test_pass_dies_are_counted_per_map(table):
    maps = packed_column(table.slice(3, 9))
    assert pass_dies(maps).tolist() == [int((m == PASS).sum()) for m in maps.unpack()]


def test_score_table_pred_map_matches_predict_maps_on_a_slice(table):
    part = table.slice(9, 13)
    m = _confident_model()
    preds = predict_maps(m, die_maps(part))
    every = {"ring": 4.0, "scratch": 4.0, "local zone": 4.0, "circle": 4.0}
    cleared = 0
    for rules, follow in itertools.product(({}, {"scratch": 4.0}, every), (False, True)):
        cfg = load_config("tiny", {"verdict.min_elongation_by_class": rules, "verdict.dies_follow_patterns": follow})
        scorer = Scorer(m, cfg.verdict, cfg)
        out = scorer.score_table(part, model_name="m", model_version="1")
        # pred_map is what the dies_* columns count: the network's map after the shape rules
        shaped = scorer.shaped_maps(preds, die_maps(part))
        for blob, pred in zip(out.column("pred_map").to_pylist(), shaped):
            assert blob == pred.tobytes()
        assert out.column("fail_dies").to_pylist() == [int((d == FAIL).sum()) for d in die_maps(part)]
        for cid, name in enumerate(cfg.class_names[1:], start=1):
            counted = [int(((p == cid) & (d == FAIL)).sum()) for p, d in zip(shaped, die_maps(part))]
            assert out.column(dies_column(name)).to_pylist() == counted
        # the table's verdicts are the scorer's verdicts of the same maps
        verdicts = scorer.verdicts(preds, die_maps(part))
        assert out.column("dominant_pattern").to_pylist() == verdicts.dominant_pattern
        changed = sum(not np.array_equal(a, b) for a, b in zip(shaped, preds))
        if not follow:
            assert (changed > 0) == bool(rules)  # the rules did act on this model's maps
            continue
        # dies follow patterns: a map shows only the patterns its wafer's verdict finds
        for pred, present in zip(shaped, out.column("patterns").to_pylist()):
            assert {cfg.class_names[c] for c in np.unique(pred)} - {"background"} <= set(present.split("+"))
        unfollowed = scorer.shaped_maps(preds, die_maps(part), follow=False)
        cleared += sum(not np.array_equal(a, b) for a, b in zip(shaped, unfollowed))
    assert cleared > 0  # some wafer had dies of a pattern its verdict does not find


def test_a_class_named_local_zone_gets_the_same_column_in_every_table(table):
    """One naming rule: the predictions table and the verdict table agree on 'Local-Zone'."""
    cfg = load_config("tiny")
    classes = [c.model_copy(update={"name": "Local-Zone"}) if c.name == "local zone" else c for c in cfg.classes]
    cfg = cfg.model_copy(update={"classes": classes})
    assert "Local-Zone" in cfg.class_names
    scorer = Scorer(ConstantModel(cfg.class_names.index("Local-Zone")), cfg.verdict, cfg)
    out = scorer.score_table(table, model_name="m", model_version="1")
    assert dies_column("Local-Zone") == "dies_local_zone" and "dies_local_zone" in out.column_names
    verdict_columns = scorer.verdicts(scorer.predict_maps(die_maps(table)), die_maps(table)).columns()
    assert "dies_local_zone" in verdict_columns
    assert verdict_columns["dies_local_zone"] == out.column("dies_local_zone").to_pylist()
    assert set(out.column("dominant_pattern").to_pylist()) <= {"Local-Zone", "none"}


def test_patterns_column_follows_dominant_share_and_the_die_columns(table):
    cfg = load_config("tiny", {"verdict.min_dies": 3, "verdict.min_share": 0.05})
    scorer = Scorer(_confident_model(0), cfg.verdict, cfg)  # paints single, mixed and no patterns here
    out = scorer.score_table(table, model_name="m", model_version="1")
    names = out.column_names
    assert names[names.index("dominant_share") + 1] == "patterns"
    assert out.schema.field("patterns").type == "string"
    patterns, fail = out.column("patterns").to_pylist(), out.column("fail_dies").to_pylist()
    for i, text in enumerate(patterns):
        want = [n for n in cfg.class_names[1:]  # class-id order, by the thresholds on the dies_* columns
                if (d := out.column(dies_column(n))[i].as_py()) >= 3 and d >= 0.05 * max(fail[i], 1)]
        assert text == ("+".join(want) or "none")
        assert (text == "none") == (out.column("dominant_pattern")[i].as_py() == "none")
    assert "none" in patterns and any("+" in p for p in patterns), "the check needs none and mixed wafers"
