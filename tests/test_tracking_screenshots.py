"""scripts/screenshots.py finds the pages to photograph through the MLflow API (no browser here:
the pictures themselves are taken by hand, see docs/mlflow.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest
import torch

from fcn_core.config import Config
from fcn_core.models import build_fcn
from fcn_core.scorer import Scorer, save_scorer
from tracking import nightly, registry, runs, store

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "screenshots.py"


def load_script():
    spec = importlib.util.spec_from_file_location("screenshots", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pages_point_at_the_champion_its_training_and_the_newest_night(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = Config(home=str(tmp_path))
    client = store.open_store(cfg)
    torch.manual_seed(0)
    path = save_scorer(Scorer(model=build_fcn("fcn8s", n_classes=cfg.n_classes, preset="compact").eval(),
                              verdict=cfg.verdict, cfg=cfg), tmp_path / "scorer.pt")
    trained = runs.start_parent_run(client, cfg, data_fingerprint="a" * 16)
    first = registry.register_model(cfg, client=client, run_id=trained, scorer_path=path, candidate_score=0.7,
                                    rescore=lambda s: 0.0)
    later = runs.start_parent_run(client, cfg, data_fingerprint="b" * 16)  # newer, but not the champion
    registry.register_model(cfg, client=client, run_id=later, scorer_path=path, candidate_score=0.5,
                            rescore=lambda s: 0.7)
    picture = tmp_path / "night.png"
    picture.write_bytes(b"\x89PNG\r\n")
    for night in ("2026-11-27", "2026-11-28"):
        newest = nightly.log_night(cfg, night=night, wafers_scored=1, wafers=1, pattern_counts={"none": 1},
                                   pattern_rates={"none": 1.0}, lots=pd.DataFrame(), predictions="p",
                                   model_name="wafer-fcn", model_version="1", pictures=[picture], client=client)
    pages = load_script().mlflow_pages(cfg.tracking_uri, "http://ui", experiment="wafer-fcn", model="wafer-fcn")
    exp = client.get_experiment_by_name("wafer-fcn").experiment_id
    night_exp = client.get_experiment_by_name("wafer-fcn-nightly").experiment_id
    model_id = client.get_model_version("wafer-fcn", first.version).tags["model_id"]
    ml = "?workflowType=machine_learning"
    assert pages == {
        "mlflow_runs": runs.runs_table_url("http://ui", exp),
        "mlflow_ladder": runs.ladder_chart_url("http://ui", exp),
        "mlflow_run": f"http://ui/#/experiments/{exp}/runs/{trained}{ml}",
        "mlflow_version": f"http://ui/#/models/wafer-fcn/versions/1{ml}",
        "mlflow_logged_model": f"http://ui/#/experiments/{exp}/models/{model_id}{ml}",
        "mlflow_nightly": f"http://ui/#/experiments/{night_exp}/runs/{newest}{ml}",
        "mlflow_nightly_trend": nightly.nights_chart_url("http://ui", night_exp),
        "mlflow_nightly_picture": f"http://ui/#/experiments/{night_exp}/runs/{newest}/artifactPath/pictures/night.png{ml}",
    }
    with pytest.raises(SystemExit, match="no experiment 'other'"):
        load_script().mlflow_pages(cfg.tracking_uri, "http://ui", experiment="other", model="wafer-fcn")
