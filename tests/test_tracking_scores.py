"""What the MLflow UI shows of a training, checked through the API against a real SQLite store:
the experiment's type, run names, per-stage score keys and the ladder, calibration as params and
a table (not metrics), and the splits as dataset inputs (tracking/runs, scores, datasets)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fcn_core.config import Config, VerdictConfig
from tracking import datasets, provenance, runs, scores, store


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv(runs.UI_URL_ENV, raising=False)
        yield tmp_path_factory.mktemp("wafer-fcn-home")


@pytest.fixture(scope="module")
def client(home):
    return store.open_store(Config(home=str(home)))


def training(client, home, *, stages=("fcn32s", "fcn16s", "fcn8s"), name="tiny") -> tuple[str, dict[str, str]]:
    cfg = Config(home=str(home), name=name)
    parent = runs.start_parent_run(client, cfg, data_fingerprint="0123456789abcdef")
    stage_runs = {s: runs.start_stage_run(client, cfg, parent_run_id=parent, stage=s, log_system_metrics=False)
                  for s in stages}
    return parent, stage_runs


def eval_scores(fail_iu: float) -> dict:
    """The dict form of an EvalScores (as the evaluate task returns it)."""
    return {"fail_only": {"pixel_acc": fail_iu + 0.2, "mean_acc": fail_iu + 0.1, "mean_iu": fail_iu,
                          "fw_iu": fail_iu + 0.05},
            "on_wafer": {"pixel_acc": 0.99, "mean_acc": 0.9, "mean_iu": fail_iu + 0.3, "fw_iu": float("nan")},
            "n_wafers": 40}


# -- experiment and run names -------------------------------------------------------------------------


def test_experiment_is_typed_for_model_training_new_and_old(home, client, tmp_path):
    exp = client.get_experiment_by_name("wafer-fcn")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on runs
    # an experiment created before (untyped, or typed as GenAI by hand) is typed on next use
    cfg = Config(home=str(home), tracking={"experiment": "older"})
    old = client.create_experiment("older", artifact_location=store.artifact_root(cfg))
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    assert store.experiment_id(client, cfg) == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_parent_run_name_says_config_day_and_data(home, client):
    parent, stage_runs = training(client, home, stages=("fcn32s", "finetune"))
    run = client.get_run(parent)
    day = time.strftime("%Y-%m-%d", time.gmtime(run.info.start_time / 1000))
    assert run.info.run_name == f"tiny-{day}-012345"
    assert runs.parent_run_name(Config(name="big"), "fedcba9876543210", when=0) == "big-1970-01-01-fedcba"
    names = {client.get_run(r).info.run_name: client.get_run(r).data.tags["stage"] for r in stage_runs.values()}
    assert names == {"FCN-32s": "fcn32s", "fine-tuned on real maps": "finetune"}


def test_runs_table_view_shows_score_columns(home, client):
    training(client, home)
    exp = client.get_experiment_by_name("wafer-fcn")
    state = json.loads(exp.tags[f"mlflow.sharedViewState.{runs.RUNS_VIEW_KEY}"])
    assert "metrics.`test_fail_mean_iu`" in state["selectedColumns"]
    assert "metrics.`real_macro_f1`" in state["selectedColumns"]
    assert state["orderByKey"] == "attributes.start_time" and state["orderByAsc"] is False
    ladder = json.loads(exp.tags[f"mlflow.sharedViewState.{runs.LADDER_VIEW_KEY}"])
    assert ladder["chartsSearchFilter"] == "test_fail" and ladder["globalLineChartConfig"]["xAxisKey"] == "step"
    assert runs.ladder_chart_url("http://ui:5000", exp.experiment_id).endswith(
        f"runs?viewStateShareKey={runs.LADDER_VIEW_KEY}&compareRunsMode=CHART&workflowType=machine_learning")
    assert runs.runs_table_url("http://ui:5000/", exp.experiment_id) == \
        f"http://ui:5000/#/experiments/{exp.experiment_id}/runs?viewStateShareKey={runs.RUNS_VIEW_KEY}&workflowType=machine_learning"


# -- scores -------------------------------------------------------------------------------------------


def test_stage_scores_one_key_per_measure_and_the_ladder_on_the_parent(home, client):
    parent, stage_runs = training(client, home)
    ladder = {"fcn32s": 0.41, "fcn16s": 0.52, "fcn8s": 0.63}
    logged = scores.log_test_scores(client, parent, {s: eval_scores(v) for s, v in ladder.items()})
    assert logged == stage_runs
    for stage, run_id in stage_runs.items():
        metrics = client.get_run(run_id).data.metrics
        assert metrics["test_fail_mean_iu"] == pytest.approx(ladder[stage])
        assert metrics["test_fail_pixel_acc"] == pytest.approx(ladder[stage] + 0.2)
        assert metrics["test_on_wafer_mean_iu"] == pytest.approx(ladder[stage] + 0.3)
        assert "test_on_wafer_fw_iu" not in metrics  # NaN is not logged
        assert not any("/" in key for key in metrics)  # no per-stage sections
    history = client.get_metric_history(parent, "test_fail_mean_iu")
    assert sorted((m.step, round(m.value, 2)) for m in history) == [(0, 0.41), (1, 0.52), (2, 0.63)]
    assert scores.stage_step("fcn1s") == 5 and scores.stage_step("finetune") == 6
    with pytest.raises(ValueError, match="unknown stage 'fcn3s'"):
        scores.stage_step("fcn3s")


def test_log_stage_scores_on_one_run_and_real_scores_laddered(home, client):
    parent, stage_runs = training(client, home, stages=("fcn8s", "finetune"))
    out = scores.log_stage_scores(client, stage_runs["fcn8s"], eval_scores(0.6))
    assert out["test_fail_mean_iu"] == 0.6 and client.get_run(stage_runs["fcn8s"]).data.metrics["test_fail_fw_iu"] == \
        pytest.approx(0.65)
    scores.log_real_scores(client, parent, {"fcn8s": {"macro_f1": 0.8, "accuracy": 0.9},
                                            "finetune": {"macro_f1": 0.85, "recall_scratch": 0.7}})
    assert client.get_run(stage_runs["finetune"]).data.metrics["real_recall_scratch"] == 0.7
    history = client.get_metric_history(parent, "real_macro_f1")
    assert sorted((m.step, m.value) for m in history) == [(2, 0.8), (6, 0.85)]


def test_calibration_thresholds_are_params_and_a_table_not_metrics(home, client, tmp_path):
    _, stage_runs = training(client, home, stages=("finetune",))
    run_id = stage_runs["finetune"]
    cfg = Config(home=str(home))
    verdict = VerdictConfig(min_dies=4, min_share=0.1, min_dies_by_class={"scratch": 2},
                            min_elongation_by_class={"scratch": 4.0}, calibrated_on="real.parquet")
    rows = scores.log_calibration(client, run_id, verdict, 0.812, cfg.class_names)
    run = client.get_run(run_id)
    assert set(run.data.metrics) == {"calibration_macro_f1"}  # the score; thresholds are settings
    assert run.data.params["calibration.scratch.min_dies"] == "2"
    assert run.data.params["calibration.scratch.min_elongation"] == "4"
    assert run.data.params["calibration.calibrated_on"] == "real.parquet"
    patterns = cfg.class_names[1:]
    assert [r["pattern"] for r in rows] == patterns
    doc = json.loads(Path(client.download_artifacts(run_id, "calibration/thresholds.json", str(tmp_path))).read_text())
    assert doc["macro_f1"] == 0.812 and doc["thresholds"] == rows
    assert next(r for r in doc["thresholds"] if r["pattern"] == "scratch")["min_dies"] == 2
    md = Path(client.download_artifacts(run_id, "calibration/thresholds.md", str(tmp_path))).read_text()
    assert "| scratch | 2 | 0.100 | 4 |" in md and "macro-F1 0.812" in md
    # a second calibration on the same run: params keep their first values, the table the latest
    scores.log_calibration(client, run_id, verdict.model_copy(update={"min_dies_by_class": {"scratch": 3}}), 0.8,
                           cfg.class_names)
    assert client.get_run(run_id).data.params["calibration.scratch.min_dies"] == "2"
    doc = json.loads(Path(client.download_artifacts(run_id, "calibration/thresholds.json", str(tmp_path))).read_text())
    assert next(r for r in doc["thresholds"] if r["pattern"] == "scratch")["min_dies"] == 3


# -- datasets -----------------------------------------------------------------------------------------


def test_splits_are_logged_as_dataset_inputs_with_their_fingerprint(home, client, tmp_path):
    parent, _ = training(client, home, stages=())
    splits = {}
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        path = tmp_path / f"{split}.parquet"
        pq.write_table(pa.table({"wafer_id": [f"{split}{i}" for i in range(n)], "lot_id": ["L1"] * n}), path)
        splits[split] = str(path)
    folder = tmp_path / "curated"
    (folder / "date=2024-01-01").mkdir(parents=True)
    pq.write_table(pa.table({"wafer_id": ["a", "b"]}), folder / "date=2024-01-01" / "part-0.parquet")
    pq.write_table(pa.table({"wafer_id": ["c"]}), folder / "part-1.parquet")
    splits["curated"] = str(folder)
    logged = datasets.log_datasets(client, parent, splits)
    inputs = client.get_run(parent).inputs.dataset_inputs
    by_context = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
    assert set(by_context) == {"train", "val", "test", "curated"}
    for split, path in splits.items():
        ds = by_context[split]
        assert ds.name == f"wafers-{split}" and ds.digest == provenance.data_fingerprint([path])
        assert json.loads(ds.source)["uri"] == str(Path(path).resolve()) and ds.source_type == "local"
    assert json.loads(by_context["train"].profile) == {"num_rows": 5, "num_files": 1}
    assert json.loads(by_context["curated"].profile) == {"num_rows": 3, "num_files": 2}
    columns = json.loads(by_context["val"].schema)["mlflow_colspec"]
    assert [c["name"] for c in columns] == ["wafer_id", "lot_id"] and columns[0]["type"] == "string"
    assert [d.name for d in logged] == [f"wafers-{s}" for s in splits]
    assert re.fullmatch(r"[0-9a-f]{16}", logged[0].digest)
    with pytest.raises(Exception, match="no such file"):
        datasets.log_datasets(client, parent, {"gone": tmp_path / "absent.parquet"})
