import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fcn_core.config import SplitConfig, SynthConfig, load_config
from fcn_core.ingest import ingest, list_partitions, read_curated
from fcn_core.models import build_fcn
from fcn_core.predict import prepare_model
from fcn_core.synth import generate_wafers
from fcn_core.table import FAIL, die_maps, write_parquet_atomic
from tasks.scoring import (
    part_files,
    predictions_path,
    registered_model,
    remember_model,
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
    remember_model(uri, "wafer-fcn", "1", build_fcn("fcn8s", n_classes=5))
    return uri


def test_full_then_append_scores_each_wafer_once(prefect_harness, tmp_path, curated, model_key):
    torch.set_num_threads(1)
    cfg = load_config("tiny", {"tracking.tracking_uri": model_key, "train.device": "cpu"})
    date = list_partitions(curated)[0]
    parts = part_files(str(curated), date)
    assert len(parts) == 2
    common = dict(config=cfg.to_dict(), date=date, curated_root=str(curated),
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
        score_partition.fn(config=cfg.to_dict(), date="2026-01-01", curated_root=str(curated), parts=[],
                           action="merge", predictions_root="/nowhere", model_name="wafer-fcn",
                           model_version="1", run_ids={})


def test_registered_model_is_loaded_once_per_process(model_key):
    assert registered_model(model_key, "wafer-fcn", "1") is registered_model(model_key, "wafer-fcn", "1")


def test_a_shared_model_is_converted_once_before_tasks_use_it(model_key):
    """Tasks scoring concurrently must never see half-converted weights (other kernels, other rounding)."""
    model = registered_model(model_key, "wafer-fcn", "1")
    assert not model.training
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    before = [w.data_ptr() for w in convs]
    prepare_model(model, channels_last=True, subpixel=False)  # what score_table does on every call
    assert [w.data_ptr() for w in convs] == before  # nothing left to convert: the weights stay put
