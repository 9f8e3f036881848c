"""fcn_core.scorer: the served unit (model + verdict rules + padding + classes) and its bundles."""
import threading

import numpy as np
import pytest
import torch

from fcn_core.checkpoint import model_state, save_checkpoint
from fcn_core.config import LineRescueConfig, VerdictConfig, load_config
from fcn_core.inference.packed import predict_maps
from fcn_core.models import build_fcn
from fcn_core.scorer import NotAScorerError, Scorer, load_scorer, save_scorer, scorer_from_checkpoint
from fcn_core.synth import generate_wafers
from fcn_core.table import FAIL, die_maps
from fcn_core.verdicts import wafer_verdicts


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


@pytest.fixture(scope="module")
def table(cfg):
    return generate_wafers(30, seed=4, synth=cfg.data.synth)


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    m = build_fcn("fcn8s", n_classes=cfg.n_classes, preset=cfg.model.preset, geometry=cfg.model.geometry)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("score"):
                p.normal_(0, 0.2)
    return m.eval()


def test_predict_maps_is_the_networks_segmentation_with_the_scorers_padding(cfg, table):
    model = _model(cfg)
    scorer = Scorer(model, cfg.verdict, cfg)
    maps = die_maps(table)
    got = scorer.predict_maps(maps, bf16=False)
    want = predict_maps(model, maps, bf16=False, multiple=cfg.data.pad_multiple, fixed=cfg.data.pad_fixed)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_verdicts_use_the_scorers_rules(cfg, table):
    model = _model(cfg)
    maps = die_maps(table)
    strict = VerdictConfig(min_dies=10_000)  # no wafer has that many dies of one pattern
    loose = VerdictConfig(min_dies=1, min_share=0.0, min_elongation_by_class={"scratch": 4.0})
    preds = Scorer(model, loose, cfg).predict_maps(maps)
    assert set(Scorer(model, strict, cfg).verdicts(preds, maps).dominant_pattern) == {"none"}
    scorer = Scorer(model, loose, cfg)
    v = scorer.verdicts(preds, maps)
    want = wafer_verdicts(preds, maps, class_names=cfg.class_names, verdict=loose)
    assert v.dominant_pattern == want.dominant_pattern and (v.dies == want.dies).all()
    shaped = scorer.shaped_maps(preds, maps)
    assert (scorer.verdicts(shaped, maps, shaped=True).dies == v.dies).all()
    assert v.fail_dies.tolist() == [int((m == FAIL).sum()) for m in maps]


def test_the_fast_copy_is_made_once_and_shared_between_threads(cfg, table):
    model = _model(cfg)
    before = model.conv1_1.weight.detach().clone()
    scorer = Scorer(model, cfg.verdict, cfg)
    nets = []
    threads = [threading.Thread(target=lambda: nets.append(scorer.inference_net())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(n is nets[0] for n in nets) and scorer.inference_net() is nets[0]
    assert nets[0] is not model and torch.equal(model.conv1_1.weight, before)
    assert not model.conv1_1.weight.is_contiguous(memory_format=torch.channels_last)  # the model is left alone
    assert scorer.with_verdict(VerdictConfig(min_dies=3)).inference_net() is nets[0]  # same model, same copy


def test_score_table_with_concurrent_callers_matches_one_caller(cfg, table):
    scorer = Scorer(_model(cfg), cfg.verdict, cfg)
    alone = scorer.score_table(table, model_name="m", model_version="1", bf16=False, num_threads=1)
    outs: list = [None] * 3

    def run(i: int) -> None:
        outs[i] = scorer.score_table(table, model_name="m", model_version="1", bf16=False, num_threads=1)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(o.equals(alone) for o in outs)


def test_calibrated_fits_thresholds_and_keeps_the_shape_rules(cfg, table):
    rules = cfg.verdict.model_copy(update={"min_elongation_by_class": {"scratch": 4.0}})
    scorer = Scorer(_model(cfg), rules, cfg)
    names = {"none": "None", "ring": "Edge-Ring", "scratch": "Scratch", "local zone": "Loc", "circle": "Center"}
    labels = [names.get(x) for x in table.column("wafer_label").to_pylist()]
    calibrated, f1 = scorer.calibrated(die_maps(table), labels, source="part.parquet")
    assert calibrated.verdict.calibrated_on == "part.parquet" and 0.0 <= f1 <= 1.0
    assert calibrated.verdict.min_elongation_by_class == {"scratch": 4.0}
    assert calibrated.model is scorer.model and scorer.verdict == rules  # a new scorer; this one unchanged


def test_bundle_round_trip_scores_the_same(cfg, table, tmp_path):
    verdict = VerdictConfig(min_dies=4, calibrated_on="x")
    scorer = Scorer(_model(cfg), verdict, cfg)
    path = save_scorer(scorer, tmp_path / "scorer.pt")
    again = load_scorer(path)
    assert again.verdict == verdict and again.class_names == cfg.class_names
    a = scorer.score_table(table, model_name="m", model_version="1", bf16=False)
    b = again.score_table(table, model_name="m", model_version="1", bf16=False)
    assert a.equals(b)
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(NotAScorerError, match="not a wafer-fcn scorer bundle"):
        load_scorer(tmp_path / "other.pt")


def test_scorer_from_checkpoint_uses_its_config_or_the_given_rules(cfg, tmp_path):
    model = _model(cfg)
    ckpt = save_checkpoint(tmp_path / "best.pt", {"arch": dict(model.arch), "model": model_state(model),
                                                  "config": cfg.to_dict()})
    scorer = scorer_from_checkpoint(ckpt)
    assert scorer.verdict == cfg.verdict and scorer.cfg.class_names == cfg.class_names
    assert not hasattr(scorer.model, "verdict")  # nothing rides on the module
    rules = VerdictConfig(min_dies=7, calibrated_on="y")
    assert scorer_from_checkpoint(ckpt, verdict=rules).verdict == rules
    for a, b in zip(scorer.model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_calibration_reads_every_pattern_and_keeps_dies_follow_patterns(cfg, table):
    """Thresholds are fitted to the maps before any pattern is cleared: a scorer whose own thresholds
    would clear every pattern (min_dies 10,000) fits the same ones as a scorer that clears nothing."""
    names = {"none": "None", "ring": "Edge-Ring", "scratch": "Scratch", "local zone": "Loc", "circle": "Center"}
    labels = [names.get(x) for x in table.column("wafer_label").to_pylist()]
    fits = {}
    for follow in (True, False):
        rules = cfg.verdict.model_copy(update={"min_dies": 10_000, "dies_follow_patterns": follow,
                                               "line_rescue": LineRescueConfig(min_group_dies=20 + follow)})
        calibrated, f1 = Scorer(_model(cfg), rules, cfg).calibrated(die_maps(table), labels, source="part")
        assert calibrated.verdict.dies_follow_patterns == follow  # not searched: kept as it was
        assert calibrated.verdict.line_rescue == rules.line_rescue  # a shape rule, not searched: kept too
        fits[follow] = (calibrated.verdict.model_dump(exclude={"dies_follow_patterns", "line_rescue"}), f1)
    assert fits[True] == fits[False] and fits[True][1] > 0.2


def test_calibrated_joint_fits_one_set_of_thresholds_to_both_kinds_of_wafer(cfg, table):
    from fcn_core.verdicts import multilabel_scores, real_eval_report, verdict_labels

    rules = cfg.verdict.model_copy(update={"min_elongation_by_class": {"scratch": 4.0}})
    scorer = Scorer(_model(cfg), rules, cfg)
    maps = die_maps(table)
    names = {"none": "None", "ring": "Edge-Ring", "scratch": "Scratch", "local zone": "Loc", "circle": "Center"}
    synthetic = table.column("wafer_label").to_pylist()  # 'ring+circle' on mixed synthetic wafers
    dataset = ["+".join(names[p] for p in x.split("+")) for x in synthetic]
    mixed = (maps[:15], dataset[:15])  # holds 'Edge-Ring+Center' and 'Scratch+Center'
    single = (maps[15:], dataset[15:])  # one pattern each
    assert any("+" in x for x in mixed[1]) and not any("+" in x for x in single[1])
    calibrated, f1 = scorer.calibrated_joint(single, mixed, source="wm811k+mixed", bf16=False)
    assert calibrated.verdict.calibrated_on == "wm811k+mixed" and 0.0 <= f1 <= 1.0
    assert calibrated.verdict.min_elongation_by_class == {"scratch": 4.0}
    assert calibrated.model is scorer.model and scorer.verdict == rules  # a new scorer; this one unchanged
    # the score it reports is the mean of both macro-F1s of the calibrated scorer's own verdicts
    single_v = calibrated.verdicts(calibrated.predict_maps(single[0], bf16=False), single[0])
    mixed_v = calibrated.verdicts(calibrated.predict_maps(mixed[0], bf16=False), mixed[0])
    first = real_eval_report(single[1], single_v.dominant_pattern, labels=verdict_labels(cfg.class_names))
    second = multilabel_scores(mixed[1], mixed_v.patterns, pattern_names=cfg.class_names[1:])
    assert f1 == pytest.approx(0.5 * (first.scores["macro_f1"] + second["macro_f1"]), rel=1e-12)


def test_a_mirror_tta_scorer_labels_through_the_mirror_and_keeps_it_in_its_bundle(cfg, table, tmp_path):
    """model.tta travels with the model (its config is in the bundle): predict, calibration and the
    nightly products all label maps the way the test scores were made."""
    from fcn_core.evaluate import evaluate
    from fcn_core.data import WaferSet

    mirrored_cfg = load_config("tiny", {"model.tta": "mirror"})
    model = _model(cfg)
    plain, mirror = Scorer(model, cfg.verdict, cfg), Scorer(model, cfg.verdict, mirrored_cfg)
    assert (plain.tta, mirror.tta) == ("none", "mirror")
    maps = die_maps(table)
    want = predict_maps(model, maps, bf16=False, tta="mirror", multiple=cfg.data.pad_multiple)
    got = mirror.predict_maps(maps, bf16=False)
    assert all((a == b).all() for a, b in zip(got, want))
    assert any((a != b).any() for a, b in zip(got, plain.predict_maps(maps, bf16=False)))
    again = load_scorer(save_scorer(mirror, tmp_path / "scorer.pt"))
    assert again.tta == "mirror"
    assert all((a == b).all() for a, b in zip(again.predict_maps(maps, bf16=False), got))
    wafers = WaferSet.from_table(table)
    scores = {t: evaluate(model, wafers, n_classes=cfg.n_classes, tta=t).hist_fail for t in ("none", "mirror")}
    assert scores["none"].sum() == scores["mirror"].sum() and (scores["none"] != scores["mirror"]).any()
