import datetime as dt
import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from fcn_core.config import SynthConfig, load_config
from fcn_core.synth import generate_wafers
from fcn_core.table import write_parquet_atomic
from flows.nightly_inference import NightlyParams, nightly_inference
from flows.train_fcn import TrainParams, train_fcn
from fcn_core.watermark import WATERMARK_NAME

NIGHT = SynthConfig(wafers_per_lot=5, size_max=40, nights=2)


def night_drop(path, *, n: int = 40, start_index: int = 0, day: dt.date = dt.date(2026, 3, 1)) -> str:
    """Production-like wafers (no labels) captured over two days."""
    table = generate_wafers(n, seed=77, synth=NIGHT, start_index=start_index, start_date=day)
    table = table.set_column(table.schema.get_field_index("label_map"), "label_map",
                             pa.nulls(table.num_rows, pa.binary()))
    write_parquet_atomic(table, path)
    return str(path)


@pytest.fixture(scope="module")
def champion_store(prefect_harness, tmp_path_factory) -> str:
    """A tracking store holding a registered champion (the tiny training, once per module)."""
    torch.set_num_threads(1)
    home = tmp_path_factory.mktemp("trained")
    uri = f"sqlite:///{home}/mlflow.db"
    state = train_fcn(TrainParams(config="tiny", overrides={"home": str(home), "tracking.tracking_uri": uri,
                                                            "data.synth.wafers_per_lot": 2}), return_state=True)
    assert state.is_completed(), state.message
    return uri


def nightly(home, store, **kw) -> NightlyParams:
    return NightlyParams(config="tiny", overrides={"home": str(home), "tracking.tracking_uri": store}, **kw)


def predictions(home) -> dict[str, pa.Table]:
    root = home / "predictions"
    return {p.parent.name[5:]: pq.read_table(p) for p in sorted(root.glob("date=*/predictions.parquet"))}


def test_no_champion_is_one_clear_failure(champion_store, tmp_path):
    params = NightlyParams(config="tiny", overrides={"home": str(tmp_path / "home"), "tracking.tracking_uri":
                                                     champion_store, "tracking.registered_model": "other-model"})
    state = nightly_inference(params, return_state=True)
    assert state.is_failed()
    assert state.message.startswith("no model registered as other-model@champion")
    assert "prefect deployment run train-fcn/train-fcn" in state.message
    assert "Traceback" not in state.message


def test_scores_each_wafer_once_and_a_rerun_changes_nothing(champion_store, tmp_path):
    home = tmp_path / "home"
    drops = tmp_path / "drops"
    night_drop(drops / "n1.parquet")
    state = nightly_inference(nightly(home, champion_store, source=str(drops)), return_state=True)
    assert state.is_completed(), state.message
    first = state.result()
    assert first.wafers_scored == 40
    assert first.model == "wafer-fcn/1"
    out = predictions(home)
    assert sorted(out) == first.scored_partitions and len(out) == 2
    ids = [i for t in out.values() for i in t.column("wafer_id").to_pylist()]
    assert sorted(ids) == sorted(generate_wafers(40, seed=77, synth=NIGHT).column("wafer_id").to_pylist())
    table = next(iter(out.values()))
    assert {"pred_map", "dies_ring", "dies_local_zone", "fail_dies", "yield", "dominant_pattern",
            "dominant_share", "model_name", "model_version", "model_run_id", "flow_run_id"} <= set(table.column_names)
    assert set(table.column("flow_run_id").to_pylist()) == {str(state.state_details.flow_run_id)}
    assert all(len(r) == 32 for r in table.column("model_run_id").to_pylist())

    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))}
        assert client.read_flow_run(state.state_details.flow_run_id).name == dt.datetime.now(
            dt.timezone.utc).date().isoformat()  # no dates given: today's night
    assert {"nightly-inference-summary", "nightly-yield-loss-by-lot"} <= set(artifacts)
    newest, earlier = sorted(out, reverse=True)
    per_night = {d: t.num_rows for d, t in out.items()}
    # that night first, each night with its own total (never one sum presented as one night)
    markdown = artifacts["nightly-inference-summary"].data
    assert markdown.startswith(f"# Nightly inference: night {newest}\n")
    assert markdown.index(f"## {newest}\n") < markdown.index(f"## {earlier} (an earlier night")
    assert f"{per_night[newest]:,} wafers scored (" in markdown and f"{per_night[earlier]:,} wafers scored (" in markdown
    assert "40 wafers scored" not in markdown
    rows = artifacts["nightly-yield-loss-by-lot"].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert rows[0]["night"] == newest and {"lot", "wafers", "yield_%", "lost_%"} <= set(rows[0])
    assert all(v == round(v, 3) for r in rows for v in r.values() if isinstance(v, float))
    # the MLflow record of the night: its own experiment, the night as step, lots, picture, predictions
    from mlflow import MlflowClient

    from tracking.nightly import night_step

    mlflow = MlflowClient(tracking_uri=champion_store)
    experiment = mlflow.get_experiment_by_name("wafer-fcn-nightly")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (run,) = mlflow.search_runs([experiment.experiment_id], filter_string=(
        f"tags.`prefect.flow_run_id` = '{state.state_details.flow_run_id}'"))
    assert run.info.run_name == f"nightly-{newest}" and run.info.status == "FINISHED"
    assert run.data.params["predictions"] == first.outputs[newest]
    assert run.info.run_id in markdown
    scored = {m.step: m.value for m in mlflow.get_metric_history(run.info.run_id, "wafers_scored")}
    assert scored == {night_step(d)[0]: n for d, n in per_night.items()}  # one point per night, never a sum
    assert run.data.metrics["wafers_scored"] == per_night[newest]  # the latest value is that night's
    assert any(k.startswith("rate_") for k in run.data.metrics)
    logged = {f.path for f in mlflow.list_artifacts(run.info.run_id)} | {
        f.path for f in mlflow.list_artifacts(run.info.run_id, "pictures")}
    assert {"lots.csv", "lots.md", f"pictures/most_affected_{newest}.png"} <= logged

    watermark = (home / "predictions" / WATERMARK_NAME).read_text()
    stamps = {d: (home / "predictions" / f"date={d}" / "predictions.parquet").stat().st_mtime_ns for d in out}
    again = nightly_inference(nightly(home, champion_store, source=str(drops)))
    assert again.wafers_scored == 0 and again.scored_partitions == [] and sorted(again.skipped) == sorted(out)
    assert (home / "predictions" / WATERMARK_NAME).read_text() == watermark
    assert {d: (home / "predictions" / f"date={d}" / "predictions.parquet").stat().st_mtime_ns for d in out} == stamps

    # a late drop for the same nights: only its wafers are scored, nothing is lost
    night_drop(drops / "n2.parquet", n=10, start_index=40)
    late_state = nightly_inference(nightly(home, champion_store, source=str(drops), dates=sorted(out)),
                                   return_state=True)
    late = late_state.result()
    assert late.wafers_scored == 10
    with get_client(sync_client=True) as client:  # named by the newest night asked for
        assert client.read_flow_run(late_state.state_details.flow_run_id).name == max(out)
    after = predictions(home)
    assert sum(t.num_rows for t in after.values()) == 50
    assert len({i for t in after.values() for i in t.column("wafer_id").to_pylist()}) == 50
    entry = json.loads((home / "predictions" / WATERMARK_NAME).read_text())["partitions"]
    assert sum(e["rows"] for e in entry.values()) == 50

    # a lost predictions file is scored again on the next run
    lost = sorted(after)[0]
    (home / "predictions" / f"date={lost}" / "predictions.parquet").unlink()
    redo = nightly_inference(nightly(home, champion_store))
    assert redo.scored_partitions == [lost] and predictions(home)[lost].num_rows == after[lost].num_rows


def test_dask_runner_gives_the_same_predictions_as_threads(champion_store, tmp_path):
    drops = tmp_path / "drops"
    night_drop(drops / "n1.parquet")
    results = {}
    for runner in ("threads", "dask"):
        home = tmp_path / runner
        result = nightly_inference(nightly(home, champion_store, source=str(drops), task_runner=runner))
        assert result.wafers_scored == 40
        results[runner] = {d: t.drop_columns(["flow_run_id"]).sort_by("wafer_id") for d, t in predictions(home).items()}
    assert sorted(results["threads"]) == sorted(results["dask"])
    for day, table in results["threads"].items():
        assert table.equals(results["dask"][day]), day
        assert pc.sum(table.column("fail_dies")).as_py() > 0


def test_parameters_are_validated():
    with pytest.raises(ValueError, match="not YYYY-MM-DD"):
        NightlyParams(dates=["01/03/2026"])
    with pytest.raises(ValueError):
        NightlyParams(task_runner="ray")
    assert load_config("tiny").name == NightlyParams(config="tiny").load().name


def test_a_failed_partition_fails_the_run_keeps_the_others_and_is_redone_next_time(champion_store, tmp_path,
                                                                                    monkeypatch):
    import tasks.scoring

    home, drops = tmp_path / "home", tmp_path / "drops"
    night_drop(drops / "n1.parquet")
    real_read = tasks.scoring.read_parquet

    def flaky(path):
        if "date=2026-03-02" in str(path):
            raise OSError("object store hiccup")
        return real_read(path)

    monkeypatch.setattr(tasks.scoring, "read_parquet", flaky)
    monkeypatch.setattr(tasks.scoring.score_partition, "retries", 0)
    state = nightly_inference(nightly(home, champion_store, source=str(drops)), return_state=True)
    assert state.is_failed() and "2026-03-02: OSError: object store hiccup" in state.message
    assert sorted(predictions(home)) == ["2026-03-01"]
    assert list(json.loads((home / "predictions" / WATERMARK_NAME).read_text())["partitions"]) == ["2026-03-01"]

    monkeypatch.setattr(tasks.scoring, "read_parquet", real_read)
    again = nightly_inference(nightly(home, champion_store))
    assert again.scored_partitions == ["2026-03-02"] and again.skipped == ["2026-03-01"]
    assert sum(t.num_rows for t in predictions(home).values()) == 40
