"""tasks.training: verdict calibration and scorer bundles of trained stages."""
import hashlib

import pyarrow as pa
import torch

from fcn_core.checkpoint import model_state, save_checkpoint
from fcn_core.config import load_config
from fcn_core.models import build_fcn
from fcn_core.scorer import SCORER_FILE, load_scorer
from fcn_core.synth import generate_wafers
from fcn_core.table import write_parquet_atomic
from tracking import runs
from tracking.store import open_store
from tasks.training import calibrate_task, scorer_task


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
