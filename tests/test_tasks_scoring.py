import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fcn_core.config import SplitConfig, SynthConfig, load_config
from fcn_core.ingest import ingest, list_partitions, read_curated
from fcn_core.models import build_fcn
from fcn_core.scorer import Scorer
from fcn_core.synth import generate_wafers
from fcn_core.table import FAIL, die_maps, write_parquet_atomic
from tasks.scoring import (
    part_files,
    predictions_path,
    registered_scorer,
    remember_scorer,
    score_partition,
)

SYNTH = SynthConfig(wafers_per_lot=2, size_max=30)


@pytest.fixture
def curated(tmp_path):
    """One date partition made of two part files (two drops of the same night)."""
    root = tmp_path / "curated"
    for seed in (1, 2):
        write_parquet_atomic(generate_wafers(12, seed=seed, synth=SYNTH), tmp_path / f"d{seed}.parquet")
        ingest([tmp_path / f"d{seed}.parquet"], root, n_classes=5, split=SplitConfig())
    return root


@pytest.fixture
def model_key(tmp_path):
    torch.manual_seed(0)
    uri = f"sqlite:///{tmp_path}/unused.db"
    cfg = load_config("tiny", {"tracking.tracking_uri": uri})
    remember_scorer(uri, "wafer-fcn", "1", Scorer(build_fcn("fcn8s", n_classes=5), cfg.verdict, cfg))
    return uri


def test_full_then_append_scores_each_wafer_once(prefect_harness, tmp_path, curated, model_key):
    torch.set_num_threads(1)
    cfg = load_config("tiny", {"tracking.tracking_uri": model_key, "train.device": "cpu"})
    date = list_partitions(curated)[0]
    parts = part_files(str(curated), date)
    assert len(parts) == 2
    common = dict(cfg=cfg, date=date, curated_root=str(curated),
                  predictions_root=str(tmp_path / "pred"), model_name="wafer-fcn", model_version="1",
                  run_ids={"model_run_id": "m-run", "flow_run_id": "f-run"}, chunk_rows=5)

    first = score_partition(parts=parts[:1], action="full", **common)
    out = pq.read_table(predictions_path(str(tmp_path / "pred"), date))
    assert first["rows"] == first["scored"] == out.num_rows == first["parts"][parts[0]]

    second = score_partition(parts=parts[1:], action="append", **common)
    out = pq.read_table(second["output"])
    assert second["scored"] == second["parts"][parts[1]]
    assert out.num_rows == second["rows"] == first["rows"] + second["scored"]
    ids = out.column("wafer_id").to_pylist()
    assert len(ids) == len(set(ids))
    assert set(out.column("model_run_id").to_pylist()) == {"m-run"}
    assert set(out.column("flow_run_id").to_pylist()) == {"f-run"}
    assert set(out.column("model_version").to_pylist()) == {"1"}
    # pred_map has the label_map layout, and only fail dies can carry a pattern
    source = read_curated(curated)
    dies = dict(zip(source.column("wafer_id").to_pylist(), die_maps(source)))
    assert set(dies) == set(ids)
    for wafer_id, h, w, blob in zip(ids, out.column("height").to_pylist(), out.column("width").to_pylist(),
                                    out.column("pred_map").to_pylist()):
        pred = np.frombuffer(blob, np.uint8).reshape(h, w)
        assert (pred[dies[wafer_id] != FAIL] == 0).all()
    assert [p.name for p in (tmp_path / "pred" / f"date={date}").iterdir()] == ["predictions.parquet"]

    # "full" rewrites from the given parts only
    again = score_partition(parts=parts, action="full", **common)
    assert again["rows"] == out.num_rows


def test_bad_action_is_rejected(prefect_harness, curated, model_key):
    cfg = load_config("tiny", {"tracking.tracking_uri": model_key})
    with pytest.raises(ValueError, match="action must be"):
        score_partition.fn(cfg=cfg, date="2026-01-01", curated_root=str(curated), parts=[],
                           action="merge", predictions_root="/nowhere", model_name="wafer-fcn",
                           model_version="1", run_ids={})


def test_registered_scorer_is_loaded_once_per_process(model_key):
    cfg = load_config("tiny", {"tracking.tracking_uri": model_key})
    assert registered_scorer(cfg, "wafer-fcn", "1") is registered_scorer(cfg, "wafer-fcn", "1")


def test_a_shared_scorer_is_only_read_by_the_tasks(model_key):
    """Tasks scoring concurrently share one fast copy made before they start; the model is never changed."""
    cfg = load_config("tiny", {"tracking.tracking_uri": model_key})
    scorer = registered_scorer(cfg, "wafer-fcn", "1")
    net = scorer.inference_net()
    convs = [m.weight for m in scorer.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    before = [(w.data_ptr(), w.stride()) for w in convs]
    table = generate_wafers(6, seed=3, synth=SYNTH)
    scorer.score_table(table, model_name="wafer-fcn", model_version="1", num_threads=1)
    assert scorer.inference_net() is net
    assert [(w.data_ptr(), w.stride()) for w in convs] == before
