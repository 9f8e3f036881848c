"""tasks.training: verdict calibration and scorer bundles of trained stages."""
import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from fcn_core.checkpoint import model_state, save_checkpoint
from fcn_core.config import load_config
from fcn_core.models import build_fcn
from fcn_core.padding import IGNORE_INDEX
from fcn_core.real_split import split_held_out
from fcn_core.scorer import SCORER_FILE, load_scorer
from fcn_core.synth import generate_wafers
from fcn_core.table import FAIL, die_maps, label_maps, read_parquet, write_parquet_atomic
from fcn_core.verdicts import dataset_label_patterns
from fcn_core.weak_loss import WeakSet
from tracking import runs
from tracking.store import open_store
from tasks.training import calibrate_task, evaluate_stages, prepare_real_task, pseudo_label_task, scorer_task


def _checkpoint(path, cfg):
    torch.manual_seed(0)
    model = build_fcn("fcn8s", n_classes=cfg.n_classes, preset=cfg.model.preset, geometry=cfg.model.geometry)
    return save_checkpoint(path, {"arch": dict(model.arch), "model": model_state(model), "config": cfg.to_dict()})


def _real_like(path, cfg, n=30):
    names = {"none": "None", "ring": "Edge-Ring", "scratch": "Scratch", "local zone": "Loc", "circle": "Center"}
    table = generate_wafers(n, seed=8, synth=cfg.data.synth)
    labels = [names.get(x) for x in table.column("wafer_label").to_pylist()]
    table = table.set_column(table.schema.get_field_index("wafer_label"), "wafer_label", pa.array(labels, pa.string()))
    return write_parquet_atomic(table, path)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_calibration_writes_a_scorer_and_leaves_the_checkpoint_alone(prefect_harness, tmp_path):
    cfg = load_config("tiny", {"home": str(tmp_path / "home"), "train.device": "cpu"})
    ckpt = _checkpoint(tmp_path / "checkpoints" / "fcn8s" / "best.pt", cfg)
    before = _digest(ckpt)
    real = _real_like(tmp_path / "real_finetune.parquet", cfg)
    client = open_store(cfg)
    run = runs.start_parent_run(client, cfg, data_fingerprint="f" * 16)

    dest = calibrate_task(cfg=cfg, checkpoint=str(ckpt), real_path=str(real), stage_run_id=run)

    assert _digest(ckpt) == before  # byte-identical: the training checkpoint is never rewritten
    assert dest == str(ckpt.with_name(SCORER_FILE))
    scorer = load_scorer(dest)
    assert scorer.verdict.calibrated_on == "real_finetune.parquet"
    assert scorer.verdict.min_elongation_by_class == cfg.verdict.min_elongation_by_class
    assert not hasattr(scorer.model, "verdict")
    for a, b in zip(scorer.model.state_dict().values(), torch.load(ckpt, weights_only=True)["model"].values()):
        assert torch.equal(a, b)
    logged = client.get_run(run).data
    assert set(logged.metrics) == {"calibration_macro_f1"}  # thresholds are settings: params, not metrics
    assert logged.params["calibration.calibrated_on"] == "real_finetune.parquet"
    assert int(logged.params["calibration.scratch.min_dies"]) == scorer.verdict.thresholds(["scratch"])[0][0]


def test_an_uncalibrated_stage_is_served_with_the_configs_rules(prefect_harness, tmp_path):
    cfg = load_config("tiny", {"verdict.min_dies": 6})
    ckpt = _checkpoint(tmp_path / "fcn8s" / "best.pt", load_config("tiny"))
    before = _digest(ckpt)
    scorer = load_scorer(scorer_task(cfg=cfg, checkpoint=str(ckpt)))
    assert scorer.verdict == cfg.verdict and scorer.verdict.min_dies == 6 and not scorer.verdict.calibrated_on
    assert _digest(ckpt) == before


# -- the one honest split of the real maps, and what is scored on it --------------------------------
REAL_NAMES = {"none": "None", "ring": "Edge-Ring", "scratch": "Scratch", "local zone": "Loc", "circle": "Center"}


def _real_tables(folder, cfg, n=40):
    """The four real tables, synthetic maps dressed as them (ids say which table a row came from)."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(("wm811k-train", "mixedwm38-train", "wm811k-val", "mixedwm38-val")):
        table = generate_wafers(n, seed=seed + 20, synth=cfg.data.synth)
        labels = ["+".join(REAL_NAMES[p] for p in x.split("+")) for x in table.column("wafer_label").to_pylist()]
        ids = [f"{name}-{i}" for i in range(n)]
        table = table.set_column(table.schema.get_field_index("wafer_label"), "wafer_label", pa.array(labels))
        table = table.set_column(table.schema.get_field_index("wafer_id"), "wafer_id", pa.array(ids))
        write_parquet_atomic(table, folder / f"{name}.parquet")
    return folder


def _real_cfg(tmp_path, folder, **over):
    return load_config("tiny", {"home": str(tmp_path / "home"), "train.device": "cpu",
                                "eval.real_data": str(folder / "wm811k-val.parquet"),
                                "eval.mixed_data": str(folder / "mixedwm38-val.parquet"),
                                "train.finetune.train_tables": [str(folder / "wm811k-train.parquet"),
                                                                str(folder / "mixedwm38-train.parquet")], **over})


def _ids(path) -> set[str]:
    return set(read_parquet(path).column("wafer_id").to_pylist())


@pytest.mark.parametrize("weak_labels, trained_file", [("both", "weak_train"), ("wafer_labels", "weak_train"),
                                                       ("all_fail_dies", "train")])
def test_real_split_parts_are_disjoint_and_no_held_out_map_is_trained_on(prefect_harness, tmp_path, weak_labels,
                                                                          trained_file):
    folder = _real_tables(tmp_path / "real", load_config("tiny"))
    cfg = _real_cfg(tmp_path, folder, **{"train.finetune.weak_labels": weak_labels})
    synthetic = _real_like(tmp_path / "train.parquet", cfg, n=10)
    real = prepare_real_task(cfg=cfg, train_path=str(synthetic), out_dir=str(tmp_path / "data"))
    paths = real["paths"]
    for name, table in (("real", "wm811k-val"), ("mixed", "mixedwm38-val")):
        cal, score = _ids(paths[f"{name}_calibration"]), _ids(paths[f"{name}_scoring"])
        assert cal and score and not cal & score  # disjoint, both used
        assert cal | score == _ids(folder / f"{table}.parquet")  # together: the whole held-out table
    tuned = _ids(paths[trained_file])
    assert not any(i.startswith(("wm811k-val", "mixedwm38-val")) for i in tuned)  # never trained on
    assert any(i.startswith("wm811k-train") for i in tuned) and any(i.startswith("mixedwm38-train") for i in tuned)
    assert _ids(paths["real_train"]) == _ids(folder / "wm811k-train.parquet") | _ids(folder / "mixedwm38-train.parquet")


def test_a_held_out_table_is_refused_as_a_training_table(prefect_harness, tmp_path):
    folder = _real_tables(tmp_path / "real", load_config("tiny"), n=6)
    cfg = _real_cfg(tmp_path, folder, **{"train.finetune.train_tables": [str(folder / "wm811k-val.parquet")]})
    with pytest.raises(ValueError, match="held-out table"):
        prepare_real_task(cfg=cfg, train_path=str(folder / "wm811k-train.parquet"), out_dir=str(tmp_path / "d"))


def test_pseudo_masks_teach_only_labelled_patterns_and_keep_mixes(prefect_harness, tmp_path):
    folder = _real_tables(tmp_path / "real", load_config("tiny"))
    cfg = _real_cfg(tmp_path, folder, **{"train.finetune.weak_labels": "pseudo_masks",
                                         "train.finetune.pseudo_min_prob": 0.05})  # untrained model: every argmax is "confident"
    ckpt = _checkpoint(tmp_path / "checkpoints" / "fcn8s" / "best.pt", cfg)
    real = prepare_real_task(cfg=cfg, train_path=str(folder / "wm811k-train.parquet"), out_dir=str(tmp_path / "d"))
    assert not Path(real["paths"]["train"]).exists()  # pseudo-masks need the trained model: built later
    dest = tmp_path / "d" / "finetune_train.parquet"
    counts = pseudo_label_task(cfg=cfg, checkpoint=str(ckpt), real_train_path=real["paths"]["real_train"],
                               synthetic_path=str(folder / "wm811k-train.parquet"), dest=str(dest))
    assert counts["synthetic"] > 0  # pseudo_masks: the fine-tune file holds the synthetic split too
    tuned = read_parquet(dest)
    real_rows = tuned.slice(0, counts["weak"])
    class_id = {name: k for k, name in enumerate(cfg.class_names)}
    mixes = 0
    for label, die, lab in zip(real_rows.column("wafer_label").to_pylist(), die_maps(real_rows), label_maps(real_rows)):
        allowed = {class_id[p] for p in dataset_label_patterns(label) - {"none"}}
        taught = set(np.unique(lab[die == FAIL]).tolist()) - {0, IGNORE_INDEX}
        assert taught <= allowed, (label, taught)  # never a pattern the label does not name
        mixes += len(allowed) > 1
    assert mixes > 0  # mixed-pattern wafers are fine-tuned on
    assert counts["dies_pattern"] > 0 and counts["dies_ignored"] > 0  # taught where allowed, ignored elsewhere


def test_both_masks_exactly_the_joint_stages_real_maps_inside_their_labels(prefect_harness, tmp_path):
    folder = _real_tables(tmp_path / "real", load_config("tiny"))
    cfg = _real_cfg(tmp_path, folder, **{"train.finetune.weak_labels": "both", "train.finetune.max_per_class": 3,
                                         "train.finetune.pseudo_min_prob": 0.05})  # untrained model: every argmax is "confident"
    ckpt = _checkpoint(tmp_path / "checkpoints" / "fcn8s" / "best.pt", cfg)
    real = prepare_real_task(cfg=cfg, train_path=str(folder / "wm811k-train.parquet"), out_dir=str(tmp_path / "d"))
    weak_train = read_parquet(real["paths"]["weak_train"])
    assert weak_train.column("label_map").null_count == weak_train.num_rows  # wafer labels only, so far
    dest = tmp_path / "d" / "weak_train_masked.parquet"
    # a cap of 1 per pattern set would drop rows if the masks were capped again: they must not be
    tighter = cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "finetune": cfg.train.finetune.model_copy(update={"max_per_class": 1})})})
    counts = pseudo_label_task(cfg=tighter, checkpoint=str(ckpt), real_train_path=real["paths"]["weak_train"],
                               dest=str(dest))
    masked = read_parquet(dest)
    # the very rows the wafer-level loss trains on (already capped: not capped again), and nothing synthetic
    assert masked.column("wafer_id").to_pylist() == weak_train.column("wafer_id").to_pylist()
    assert counts["weak"] == masked.num_rows and counts["synthetic"] == 0
    class_id = {name: k for k, name in enumerate(cfg.class_names)}
    for label, die, lab in zip(masked.column("wafer_label").to_pylist(), die_maps(masked), label_maps(masked)):
        allowed = {class_id[p] for p in dataset_label_patterns(label) - {"none"}}
        assert lab is not None and set(np.unique(lab[die == FAIL]).tolist()) - {0, IGNORE_INDEX} <= allowed
    weak = WeakSet.from_table(masked, cfg.class_names)
    assert weak.has_masks and len(weak) == masked.num_rows


def test_evaluation_scores_the_scoring_parts_into_per_model_folders(prefect_harness, tmp_path):
    folder = _real_tables(tmp_path / "real", load_config("tiny"), n=60)
    cfg = _real_cfg(tmp_path, folder)
    ckpt = _checkpoint(tmp_path / "checkpoints" / "fcn8s" / "best.pt", cfg)
    scorer = scorer_task(cfg=cfg, checkpoint=str(ckpt))
    test = write_parquet_atomic(generate_wafers(12, seed=3, synth=cfg.data.synth), tmp_path / "test.parquet")
    client = open_store(cfg)
    run = runs.start_parent_run(client, cfg, data_fingerprint="f" * 16)
    out = tmp_path / "evaluation"
    evaluation = evaluate_stages(cfg=cfg, scorers={"fcn8s": scorer}, test_path=str(test), out_dir=str(out),
                                 histories=[], parent_run_id=run, model_stage="fcn8s")
    (report,) = evaluation.real
    metrics = report.metrics
    for key in ("wm811k_macro_f1", "wm811k_accuracy", "wm811k_die_purity", "wm811k_false_alarm_share",
                "mixed_macro_f1", "mixed_exact_match", "mixed_f1_scratch"):
        assert key in metrics, key
    split = split_held_out(read_parquet(folder / "wm811k-val.parquet"))
    assert metrics["wm811k_n_wafers"] <= split.scoring.num_rows < 60  # the scoring part only
    assert (out / "real" / "fcn8s" / "wm811k_fcn8s.md").exists()
    assert (out / "real" / "fcn8s" / "mixedwm38_fcn8s.md").exists()
    assert evaluation.paths["real_fcn8s_mixedwm38_misses"].endswith("real/fcn8s/mixedwm38_fcn8s_misses.png")
    assert not list(out.glob("real_maps*"))  # no flat files that another model would overwrite
    assert "MixedWM38 exact-set match" in evaluation.markdown() and "die purity" in evaluation.markdown()
    assert evaluation.real_by_stage["fcn8s"] == metrics
