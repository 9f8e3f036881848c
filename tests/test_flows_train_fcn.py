import datetime as dt
import json
from pathlib import Path

import numpy as np

import pyarrow as pa
import pytest
import torch
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId
from prefect.utilities.callables import parameter_schema
from pydantic import ValidationError

from fcn_core.config import load_config
from fcn_core.data import WaferSet
from fcn_core.report import StageOutcome
from fcn_core.synth import generate_wafers
from fcn_core.table import read_parquet, write_parquet_atomic
from flows.train_fcn import TrainParams, choose_stage, train_fcn
from tasks.data import DataQualityError

# the tiny config with small lots, so its 120 wafers split into train, val and test lots
SMALL_LOTS = {"data.synth.wafers_per_lot": 2}


def params(home, **extra) -> TrainParams:
    return TrainParams(config="tiny", overrides={**SMALL_LOTS, "home": str(home)}, **extra)


def artifacts_of(flow_run_id) -> dict[str, object]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return {a.key: a for a in found}


def task_runs_of(flow_run_id) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.state.name for r in runs}


@pytest.fixture(scope="module")
def trained(prefect_harness, tmp_path_factory):
    torch.set_num_threads(1)
    home = tmp_path_factory.mktemp("train-home")
    state = train_fcn(params(home), return_state=True)
    return home, state


def test_train_flow_trains_three_stages_and_registers_a_champion(trained):
    home, state = trained
    assert state.is_completed(), state.message
    result = state.result()
    reg = result.registration
    assert (reg.name, reg.version, reg.alias) == ("wafer-fcn", "1", "champion")
    assert list(result.scores) == ["fcn32s", "fcn16s", "fcn8s", "fcn4s", "fcn2s", "fcn1s"]
    assert result.stage in result.scores
    assert result.registration.candidate_score == result.scores[result.stage]
    assert sum(result.data["counts"].values()) == 120 and result.data["rows_quarantined"] == 0

    cfg = load_config("tiny", {"home": str(home)})
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    parent = client.get_run(result.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["stage"] for r in children) == ["fcn16s", "fcn1s", "fcn2s", "fcn32s", "fcn4s", "fcn8s"]
    assert {r.data.tags["stage"]: r.info.run_name for r in children}["fcn1s"] == "FCN-1s"
    assert all(r.info.status == "FINISHED" and "train_loss" in r.data.metrics for r in children)
    logged = {f.path for f in client.list_artifacts(parent.info.run_id, "evaluation")}
    assert {"evaluation/results.md", "evaluation/results.csv", "evaluation/learning_curves.png",
            f"evaluation/test_overlay_{result.stage}.png"} <= logged
    assert str(client.get_model_version_by_alias("wafer-fcn", "champion").version) == "1"


def test_train_flow_task_runs_and_artifacts(trained):
    home, state = trained
    flow_run_id = state.state_details.flow_run_id
    runs = task_runs_of(flow_run_id)
    assert {"train-fcn32s", "train-fcn16s", "train-fcn8s", "train-fcn1s"} <= set(runs)
    assert any(name.startswith("ingest-") for name in runs)
    artifacts = artifacts_of(flow_run_id)
    table = artifacts["train-fcn-results"]
    assert table.type == "table"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["model"] for r in rows] == ["FCN-32s", "FCN-16s", "FCN-8s", "FCN-4s", "FCN-2s", "FCN-1s"]
    # rounded, fail_mean_iu among a few short columns, the registered stage marked
    assert list(rows[0])[:3] == ["model", "wafers", "fail_mean_iu"] and len(rows[0]) <= 10
    assert all(v == round(v, 3) for r in rows for v in r.values() if isinstance(v, float))
    assert [r["registered"] for r in rows].count("yes") == 1
    assert state.result().mlflow_run_id in table.description
    md = artifacts["train-fcn-mlflow"]
    assert md.type == "markdown" and state.result().mlflow_run_id in md.data and "champion" in md.data
    # results.md is written once from the typed results, and the artifact shows the same text
    summary = state.result()
    results_md = summary.evaluation.results_md.read_text()
    assert results_md == summary.results_markdown and results_md.startswith("| model")
    assert results_md in md.data
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("gpu-0").limit == 1


def test_train_flow_is_named_typed_and_scored_where_a_reader_looks(trained, tmp_path):
    """What the MLflow and Prefect UIs show, checked through their APIs (issue 15)."""
    home, state = trained
    result = state.result()
    day = dt.datetime.now(dt.timezone.utc).date().isoformat()
    with get_client(sync_client=True) as prefect:
        assert prefect.read_flow_run(state.state_details.flow_run_id).name == f"tiny-{day}"
    client = MlflowClient(tracking_uri=load_config("tiny", {"home": str(home)}).tracking_uri)
    parent = client.get_run(result.mlflow_run_id)
    assert parent.info.run_name.startswith(f"tiny-{day}-")
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # one key per measure: every stage run has the same test and validation keys (fail dies named)
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    for run in children:
        assert {"test_fail_mean_iu", "test_on_wafer_pixel_acc", "val_fail_mean_iu",
                "best_val_fail_mean_iu"} <= set(run.data.metrics), run.data.tags["stage"]
        assert not any(k.startswith(("test/", "calibration/")) for k in run.data.metrics)
    ladder = client.get_metric_history(parent.info.run_id, "test_fail_mean_iu")
    assert sorted(m.step for m in ladder) == [0, 1, 2, 3, 4, 5]  # FCN-32s ... FCN-1s on one chart
    assert {m.step: m.value for m in ladder}[5] == pytest.approx(result.scores["fcn1s"])
    # the splits as dataset inputs, their fingerprint as digest
    contexts = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
                for i in parent.inputs.dataset_inputs}
    assert set(contexts) == {"train", "val", "test"}
    assert all(d.digest and d.name == f"wafers-{c}" for c, d in contexts.items())
    # the registered version says what it is
    version = client.get_model_version("wafer-fcn", result.registration.version)
    assert version.tags["stage"] == result.stage and version.tags["architecture"]
    assert all(value.strip() for value in version.tags.values())  # filled or absent, never blank
    assert f"stage `{result.stage}`" in version.description and "Promoted to `champion`" in version.description
    # the test overlay: patterned wafers of every class of the test split, then the worst misses
    listing = client.download_artifacts(parent.info.run_id, f"evaluation/test_overlay_{result.stage}.json",
                                        str(tmp_path))
    picks = json.loads(Path(listing).read_text())
    test = read_parquet(str(Path(result.run_dir) / "data" / "test.parquet"))
    by_id = dict(zip(test.column("wafer_id").to_pylist(), WaferSet.from_table(test).label, strict=True))
    classes = load_config("tiny").class_names
    in_test = {c for label in by_id.values() for c in np.unique(label) if c > 0}
    assert len(in_test) >= 3  # the check below means something
    shown = {c for p in picks for c in np.unique(by_id[p["wafer_id"]]) if c > 0}
    assert shown >= in_test  # the chosen wafers' truth carries every pattern class of the test split
    assert set().union(*(p["truth_patterns"] for p in picks)) == {classes[c] for c in in_test}
    assert any(p["reason"] == "worst miss" for p in picks)


def test_second_run_reuses_ingest_cache_and_applies_the_alias_policy(trained):
    home, _ = trained
    state = train_fcn(params(home), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result.registration.version == "2"
    assert result.registration.alias in ("champion", "challenger")
    assert result.registration.champion_score is not None  # the old champion was re-scored on this run's test split
    reg = result.registration
    assert reg.alias == ("champion" if reg.candidate_score >= reg.champion_score else "challenger")
    ingest_states = [s for n, s in task_runs_of(state.state_details.flow_run_id).items() if n.startswith("ingest-")]
    assert ingest_states == ["Cached"]


def test_failed_stage_fails_the_flow_and_its_mlflow_runs(trained, monkeypatch, tmp_path):
    import tasks.training

    real = tasks.training.train_stage

    def broken(cfg, *, stage, **kw):
        if stage == "fcn16s":
            raise RuntimeError("boom in fcn16s")
        return real(cfg, stage=stage, **kw)

    monkeypatch.setattr(tasks.training, "train_stage", broken)
    home, _ = trained
    store = load_config("tiny", {"home": str(home)}).tracking_uri  # an existing store: no set-up time
    state = train_fcn(TrainParams(config="tiny", overrides={**SMALL_LOTS, "home": str(tmp_path / "home"),
                                                            "tracking.tracking_uri": store}), return_state=True)
    assert state.is_failed() and "boom in fcn16s" in state.message
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("wafer-fcn").experiment_id
    (parent,) = client.search_runs([experiment], filter_string=(
        f"tags.`prefect.flow_run_id` = '{state.state_details.flow_run_id}'"))
    assert parent.info.status == "FAILED"
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.data.tags["stage"]: r.info.status for r in children} == {"fcn32s": "FINISHED", "fcn16s": "FAILED"}


def test_too_much_quarantine_fails_before_training(prefect_harness, tmp_path):
    table = generate_wafers(20, seed=5)
    heights = pa.array([2000 if i % 2 else h for i, h in enumerate(table.column("height").to_pylist())], pa.int32())
    write_parquet_atomic(table.set_column(table.schema.get_field_index("height"), "height", heights),
                         tmp_path / "drops" / "bad.parquet")
    state = train_fcn(params(tmp_path / "home", source=str(tmp_path / "drops")), return_state=True)
    assert state.is_failed()
    with pytest.raises(DataQualityError, match="size_out_of_range"):
        state.result()
    assert not (tmp_path / "home" / "mlflow.db").exists()  # nothing tracked for a run that never trained


def test_parameters_are_typed_and_strict():
    assert TrainParams(config="tiny", overrides=["train.fcn8s.epochs=2"]).load().train.fcn8s.epochs == 2
    with pytest.raises(ValidationError):
        TrainParams(config="tiny", epochs=3)  # unknown field: the server rejects it too (schema below)
    with pytest.raises(FileNotFoundError, match="config 'nope' not found"):
        TrainParams(config="nope").load()
    schema = parameter_schema(train_fcn.fn).model_dump()
    definition = schema["definitions"]["TrainParams"]
    assert definition["additionalProperties"] is False
    assert {"config", "overrides", "source", "gpu_limit", "max_quarantined_share"} <= set(definition["properties"])


def outcome(stage: str, best_val_mean_iu: float) -> StageOutcome:
    return StageOutcome(stage=stage, best_checkpoint=f"{stage}/best.pt", last_checkpoint=f"{stage}/last.pt",
                        best_epoch=0, best_val_mean_iu=best_val_mean_iu)


def test_choose_stage_prefers_best_validation_then_the_finer_stage():
    res = {"fcn32s": outcome("fcn32s", 0.5), "fcn16s": outcome("fcn16s", 0.7), "fcn8s": outcome("fcn8s", 0.7)}
    assert choose_stage(res) == "fcn8s"
    res["fcn8s"] = outcome("fcn8s", float("nan"))
    assert choose_stage(res) == "fcn16s"


def test_choose_stage_registers_the_fine_tuned_model_only_when_asked():
    res = {"fcn8s": outcome("fcn8s", 0.7), "finetune": outcome("finetune", 0.9)}
    assert choose_stage(res) == "fcn8s"  # a higher synthetic score does not make it a cascade stage
    assert choose_stage(res, prefer_finetune=True) == "finetune"


def real_like_maps(path, n: int = 60, seed: int = 11):
    """Synthetic wafers dressed as a real labelled set: WM-811K / MixedWM38 wafer labels, no die-level labels."""
    names = {"none": "None", "ring": "Edge-Ring", "scratch": "Scratch", "local zone": "Loc", "circle": "Center"}
    table = generate_wafers(n, seed=seed, synth=load_config("tiny").data.synth)
    labels = ["+".join(names[p] for p in x.split("+")) for x in table.column("wafer_label").to_pylist()]
    labels[0] = "Near-full"  # left out of every score
    table = table.set_column(table.schema.get_field_index("wafer_label"), "wafer_label", pa.array(labels))
    table = table.set_column(table.schema.get_field_index("label_map"), "label_map",
                             pa.nulls(n, pa.binary()))
    table = table.set_column(table.schema.get_field_index("wafer_id"), "wafer_id",
                             pa.array([f"{path.stem}-{i}" for i in range(n)]))
    write_parquet_atomic(table, path)
    return path


def test_weak_label_fine_tuning_trains_on_real_maps_and_scores_only_the_held_out_part(prefect_harness, tmp_path):
    tables = {name: real_like_maps(tmp_path / f"{name}.parquet", seed=11 + i) for i, name in
              enumerate(("wm811k-train", "mixedwm38-train", "wm811k-val", "mixedwm38-val"))}
    state = train_fcn(TrainParams(config="tiny", overrides={
        **SMALL_LOTS, "home": str(tmp_path / "home"), "eval.real_data": str(tables["wm811k-val"]),
        "eval.mixed_data": str(tables["mixedwm38-val"]),
        "train.finetune.train_tables": [str(tables["wm811k-train"]), str(tables["mixedwm38-train"])],
        "train.finetune.enabled": True, "train.finetune.epochs": 1, "train.finetune.candidate": True}),
        return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result.stage == "finetune" and "finetune" in result.scores
    last = list(result.scores)[-2]  # the cascade's last stage, scored beside the fine-tuned model
    assert set(result.real_by_stage) == {last, "finetune"}
    from fcn_core.table import read_parquet

    run_data = tmp_path / "home" / "runs"
    (scoring,) = run_data.glob("*/data/wm811k-val_scoring.parquet")
    (calibration,) = run_data.glob("*/data/wm811k-val_calibration.parquet")
    (mixed_scoring,) = run_data.glob("*/data/mixedwm38-val_scoring.parquet")
    scored = int(result.real_by_stage["finetune"]["wm811k_n_wafers"])
    assert 0 < scored < read_parquet(scoring).num_rows + 1 < 60  # only the scoring part (Near-full left out)
    assert int(result.real_by_stage["finetune"]["mixed_n_wafers"]) <= read_parquet(mixed_scoring).num_rows
    for key in ("wm811k_macro_f1", "wm811k_die_purity", "wm811k_false_alarm_share", "mixed_macro_f1",
                "mixed_exact_match"):
        assert key in result.real_by_stage[last] and key in result.real_by_stage["finetune"]
    # weak_labels: both (the default): the real maps trained on, beside the synthetic train split, with
    # their wafer labels and the pseudo-masks the stage before the fine-tuning drew on them
    (tuned,) = run_data.glob("*/data/weak_train.parquet")
    (masked,) = run_data.glob("*/data/weak_train_masked.parquet")
    assert _ids_in(masked) == _ids_in(tuned) and read_parquet(masked).column("label_map").null_count == 0
    assert not list(run_data.glob("*/data/finetune_train.parquet"))  # no fine-tune file: the joint stage
    tuned_ids = _ids_in(tuned)
    assert not {i for i in tuned_ids if i.startswith(("wm811k-val", "mixedwm38-val"))}  # never trained on
    assert any(i.startswith("wm811k-train") for i in tuned_ids) and any(i.startswith("mixedwm38-train")
                                                                        for i in tuned_ids)
    (mixed_calibration,) = run_data.glob("*/data/mixedwm38-val_calibration.parquet")
    calibrated_on = f"{calibration.name} + {mixed_calibration.name}"  # thresholds fitted to both tables
    cal_ids = set(read_parquet(calibration).column("wafer_id").to_pylist())
    assert cal_ids and not cal_ids & set(read_parquet(scoring).column("wafer_id").to_pylist())
    # the registered model is served with the verdict thresholds calibrated on the calibration part
    from fcn_core.scorer import load_scorer
    from tracking.registry import load_champion

    cfg = load_config("tiny", {"home": str(tmp_path / "home")})
    scorer, _, version = load_champion(cfg)
    assert version == result.registration.version
    assert scorer.verdict.calibrated_on == calibrated_on and not hasattr(scorer.model, "verdict")
    # calibration wrote scorer bundles; the training checkpoints keep the config's rules
    (tuned_ckpt,) = run_data.glob("*/checkpoints/finetune/best.pt")
    assert load_scorer(tuned_ckpt.with_name("scorer.pt")).verdict.calibrated_on == calibrated_on
    assert not torch.load(tuned_ckpt, weights_only=True)["config"]["verdict"]["calibrated_on"]
    store = MlflowClient(tracking_uri=cfg.tracking_uri)
    (tuned_run,) = store.search_runs([store.get_experiment_by_name("wafer-fcn").experiment_id],
                                     filter_string="tags.stage = 'finetune'")  # run name: its title
    assert "calibration_macro_f1" in tuned_run.data.metrics
    taught = tuned_run.data.metrics  # what the pseudo-masks taught, on the stage that learnt from them
    assert taught["pseudo_maps"] == len(_ids_in(masked))
    assert sum(taught[f"pseudo_dies_{k}"] for k in ("background", "pattern", "ignored")) > 0
    assert not any(k.startswith("calibration") and k != "calibration_macro_f1" for k in taught)
    assert {"calibration.scratch.min_dies", "calibration.ring.min_share"} <= set(tuned_run.data.params)
    assert tuned_run.data.params["calibration.calibrated_on"] == calibrated_on
    parent = store.get_run(result.mlflow_run_id)
    assert {"weak_train", "real_calibration", "mixed_calibration", "real_scoring", "mixed_scoring"} <= {
        next(t.value for t in i.tags if t.key == "mlflow.data.context") for i in parent.inputs.dataset_inputs}
    evaluation = next(run_data.glob("*/evaluation"))
    results_md = (evaluation / "results.md").read_text()
    assert results_md.count(f"calibrated on {calibrated_on}") == 2  # FCN-1s and the fine-tuned model
    assert "## Held-out real maps (scoring parts)" in results_md
    for stage in (last, "finetune"):  # one folder per model, files named after it
        assert (evaluation / "real" / stage / f"wm811k_{stage}.md").exists()
        assert (evaluation / "real" / stage / f"mixedwm38_{stage}.md").exists()


def test_fine_tuning_without_real_maps_fails_with_a_clear_message(prefect_harness, tmp_path):
    state = train_fcn(TrainParams(config="tiny", overrides={
        **SMALL_LOTS, "home": str(tmp_path / "home"), "eval.real_data": None, "train.finetune.enabled": True}),
        return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match="needs real labelled maps"):
        state.result()


def _ids_in(path) -> list[str]:
    from fcn_core.table import read_parquet

    return read_parquet(path).column("wafer_id").to_pylist()
