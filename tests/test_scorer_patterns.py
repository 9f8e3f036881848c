"""Scorer.calibrated(multilabel=True): thresholds fitted to the multi-label `patterns` verdict."""
import pytest
import torch

from fcn_core.config import load_config
from fcn_core.models import build_fcn
from fcn_core.scorer import Scorer
from fcn_core.synth import generate_wafers
from fcn_core.table import die_maps
from fcn_core.verdicts import multilabel_scores

DATASET_NAME = {"ring": "Edge-Ring", "scratch": "Scratch", "local zone": "Loc", "circle": "Center", "none": "None"}


def test_multilabel_calibration_scores_what_the_patterns_column_scores():
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = build_fcn("fcn8s", n_classes=cfg.n_classes, preset=cfg.model.preset, geometry=cfg.model.geometry)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("score"):
                p.normal_(0, 0.2)
    table = generate_wafers(40, seed=6, synth=cfg.data.synth.model_copy(update={"mixed_fraction": 0.5}))
    labels = ["+".join(DATASET_NAME[p] for p in x.split("+")) for x in table.column("wafer_label").to_pylist()]
    assert any("+" in x for x in labels), "the check needs mixed labels"
    rules = cfg.verdict.model_copy(update={"min_elongation_by_class": {"scratch": 4.0}})
    scorer = Scorer(model.eval(), rules, cfg)
    calibrated, f1 = scorer.calibrated(die_maps(table), labels, source="cal.parquet", multilabel=True)
    assert calibrated.verdict.calibrated_on == "cal.parquet"
    assert calibrated.verdict.min_elongation_by_class == {"scratch": 4.0}
    patterns = calibrated.verdicts(calibrated.predict_maps(die_maps(table)), die_maps(table)).patterns
    assert f1 == pytest.approx(multilabel_scores(labels, patterns, pattern_names=cfg.class_names[1:])["macro_f1"])
    before = scorer.verdicts(scorer.predict_maps(die_maps(table)), die_maps(table)).patterns
    assert f1 >= multilabel_scores(labels, before, pattern_names=cfg.class_names[1:])["macro_f1"]
