"""tracking/nightly.py: one MLflow run per nightly flow run, in its own typed experiment, with the
night as step so counts and pattern rates chart as trends (a real SQLite store)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pandas as pd
import pytest

from fcn_core.config import Config
from tracking import nightly, runs, store

LOTS = pd.DataFrame({"lot_id": ["L1", "L2", "L3"], "wafers": [25, 25, 10], "mean_yield": [0.9, 0.7, 0.8],
                     "loss_scratch": [0.01, 0.2, 0.0], "loss_ring": [0.0, 0.05, 0.3]})


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(runs.UI_URL_ENV, raising=False)
    return Config(home=str(tmp_path / "home"))


def record(cfg, night: str, *, scratch: int, total: int = 60, pictures=(), **extra) -> str:
    return nightly.log_night(
        cfg, night=night, wafers_scored=total, wafers=total,
        pattern_counts={"none": total - scratch, "scratch": scratch},
        pattern_rates={"none": (total - scratch) / total, "scratch": scratch / total},
        lots=LOTS, predictions=f"{cfg.home}/predictions/date={night}/predictions.parquet",
        model_name="wafer-fcn", model_version="3", flow_run_id="f-123", pictures=pictures, **extra)


def test_each_night_is_a_run_in_the_nightly_experiment_with_night_steps(cfg, tmp_path):
    picture = tmp_path / "night_predictions.png"
    picture.write_bytes(b"\x89PNG\r\n")
    first = record(cfg, "2026-11-27", scratch=6, pictures=[picture], summary_markdown="# Nightly inference\n",
                   warnings=["scratch rate jumped"])
    second = record(cfg, "2026-11-28", scratch=12)
    client = store.client(cfg.tracking_uri)
    exp = client.get_experiment_by_name("wafer-fcn-nightly")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.artifact_location == (Path(cfg.home) / "mlartifacts").as_uri()
    view = json.loads(exp.tags[f"mlflow.sharedViewState.{nightly.NIGHTS_VIEW_KEY}"])
    assert view["globalLineChartConfig"]["xAxisKey"] == "time"  # charts against the nights' dates
    assert nightly.nights_chart_url("http://ui", exp.experiment_id) == (
        f"http://ui/#/experiments/{exp.experiment_id}/runs?viewStateShareKey={nightly.NIGHTS_VIEW_KEY}"
        "&compareRunsMode=CHART&workflowType=machine_learning")
    assert not client.search_runs([client.get_experiment_by_name("wafer-fcn").experiment_id])  # no training runs

    run = client.get_run(first)
    assert run.info.run_name == "nightly-2026-11-27" and run.info.status == "FINISHED"
    assert run.info.experiment_id == exp.experiment_id
    day = (dt.date(2026, 11, 27) - dt.date(1970, 1, 1)).days
    history = client.get_metric_history(first, "rate_scratch")
    assert [(m.step, m.value) for m in history] == [(day, 0.1)]
    assert history[0].timestamp == int(dt.datetime(2026, 11, 27, tzinfo=dt.UTC).timestamp() * 1000)
    assert run.data.metrics["wafers_scratch"] == 6 and run.data.metrics["wafers_scored"] == 60
    assert run.data.metrics["jump_warnings"] == 1
    assert run.data.params["predictions"].endswith("date=2026-11-27/predictions.parquet")
    assert run.data.params["model"] == "wafer-fcn/3" and run.data.tags["prefect.flow_run_id"] == "f-123"
    assert run.data.tags["night"] == "2026-11-27" and "60 wafers scored" in run.data.tags["mlflow.note.content"]
    assert {a.path for a in client.list_artifacts(first)} == {"lots.csv", "lots.md", "summary.md", "pictures"}
    assert [a.path for a in client.list_artifacts(first, "pictures")] == ["pictures/night_predictions.png"]
    lots = pd.read_csv(client.download_artifacts(first, "lots.csv", str(tmp_path)))
    assert list(lots["lot_id"]) == ["L3", "L2", "L1"]  # worst first: 0.30, 0.25, 0.01 points lost
    md = Path(client.download_artifacts(first, "lots.md", str(tmp_path))).read_text()
    assert md.index("| L3 ") < md.index("| L2 ") < md.index("| L1 ") and "loss_total" in md

    # across runs the night steps make a trend: the second night is the next step
    found = client.search_runs([exp.experiment_id], order_by=["metrics.rate_scratch DESC"])
    assert [r.info.run_id for r in found] == [second, first]
    assert client.get_metric_history(second, "rate_scratch")[0].step == day + 1
    assert client.get_run(second).data.metrics["rate_scratch"] == 0.2


def test_more_nights_on_one_run_and_bad_input_logs_nothing(cfg, tmp_path):
    run_id = record(cfg, "2026-11-28", scratch=3)
    client = store.client(cfg.tracking_uri)
    client.update_run(run_id, status="RUNNING")
    nightly.log_night_metrics(client, run_id, "2026-11-26", pattern_counts={"scratch": 9},
                              pattern_rates={"scratch": 0.15})
    steps = [m.step for m in client.get_metric_history(run_id, "rate_scratch")]
    assert sorted(steps) == [20783, 20785]  # days since 1970-01-01
    with pytest.raises(ValueError, match="YYYY-MM-DD, got '28/11/2026'"):
        record(cfg, "28/11/2026", scratch=1)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        record(cfg, "2026-11-29", scratch=1, pictures=[tmp_path / "missing.png"])
    exp = client.get_experiment_by_name("wafer-fcn-nightly")
    assert len(client.search_runs([exp.experiment_id])) == 1  # neither bad call created a run
    assert nightly.night_step("1970-01-02") == (1, 86_400_000)
