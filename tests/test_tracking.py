"""tasks/tracking.py against a real embedded SQLite MLflow store (one store per module, fast)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mlflow import MlflowClient

from fcn_core.checkpoint import model_state, save_checkpoint
from fcn_core.config import ClassSpec, Config
from fcn_core.models import build_fcn
from tasks import tracking

torch.set_num_threads(1)
N_CLASSES = 5


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One SQLite store for the module (creating its tables takes ~1 s); tests use their own
    registered-model names so they stay independent."""
    previous_uri = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv(tracking.UI_URL_ENV, raising=False)
        yield tmp_path_factory.mktemp("wafer-fcn-home")
    mlflow.set_tracking_uri(previous_uri)


def make_cfg(home: Path, **tracking_options) -> Config:
    return Config(home=str(home), tracking=tracking_options)


@pytest.fixture(scope="module")
def client(home) -> MlflowClient:
    return tracking.configure(make_cfg(home))


def write_checkpoint(path: Path, cfg: Config, *, seed: int) -> Path:
    torch.manual_seed(seed)
    model = build_fcn("fcn8s", n_classes=cfg.n_classes, preset="compact")
    return save_checkpoint(path, {"arch": model.arch, "model": model_state(model), "config": cfg.to_dict()})


def start_training(client: MlflowClient, cfg: Config) -> str:
    return tracking.start_parent_run(client, cfg, data_fingerprint="f" * 16)


# -- store, runs, metrics, artifacts ----------------------------------------------------------------


def test_configure_puts_db_and_artifacts_in_home(home, client):
    cfg = make_cfg(home)
    assert cfg.tracking_uri == f"sqlite:///{home / 'mlflow.db'}" and cfg.tracking_uri.startswith("sqlite:////")
    assert (home / "mlflow.db").is_file()
    exp = client.get_experiment_by_name("wafer-fcn")
    assert exp.artifact_location == (home / "mlartifacts").as_uri()
    assert mlflow.get_tracking_uri() == cfg.tracking_uri
    again = tracking.configure(cfg)  # idempotent
    assert again.get_experiment_by_name("wafer-fcn").experiment_id == exp.experiment_id


def test_parent_run_params_tags_and_config_artifact(home, client):
    # 40 classes -> > 100 flattened keys: log_batch accepts 100 params per call
    classes = [ClassSpec(id=0, name="background", color="#000000")] + [
        ClassSpec(id=i, name=f"pattern {i}", color="#123456") for i in range(1, 40)
    ]
    cfg = Config(home=str(home), name="many", classes=classes)
    assert len(cfg.flat()) > 100
    run_id = tracking.start_parent_run(client, cfg, data_fingerprint="abc123", run_name="train-many")
    run = client.get_run(run_id)
    assert run.info.run_name == "train-many"
    assert run.data.params.keys() == cfg.flat().keys()
    assert run.data.params["train.fcn16s.lr"] == "0.0005"
    assert run.data.params["classes.39.name"] == "pattern 39"
    assert run.data.params["data.source"] == "None"
    assert run.data.tags["data_fingerprint"] == "abc123"
    assert run.data.tags["config_name"] == "many"
    commit = tracking.git_commit()
    assert run.data.tags.get("git_commit") == commit
    config_file = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.yaml"))
    assert Config.model_validate(yaml.safe_load(config_file.read_text())) == cfg
    tracking.end_run(client, run_id)
    assert client.get_run(run_id).info.status == "FINISHED"


def test_long_param_values_are_truncated_not_rejected(home, client):
    cfg = Config(home=str(home), name="x" * 7000)
    run_id = start_training(client, cfg)
    value = client.get_run(run_id).data.params["name"]
    assert len(value) <= 6000 and value.endswith("...[truncated]")
    tracking.end_run(client, run_id, "KILLED")


def test_stage_run_is_nested_with_epoch_and_system_metrics(home, client):
    cfg = make_cfg(home)
    parent = start_training(client, cfg)
    stage = tracking.start_stage_run(client, cfg, parent_run_id=parent, stage="fcn16s", sampling_interval=0.1)
    log_epoch = tracking.epoch_logger(client, stage)
    for epoch in range(3):
        log_epoch({"stage": "fcn16s", "epoch": epoch, "train_loss": 1.0 / (epoch + 1), "lr": 5e-4,
                   "val_mean_iu": np.float32(0.5 + 0.1 * epoch), "wafers_per_s": torch.tensor(100.0 + epoch),
                   "note": "not a number", "flag": True})
    time.sleep(0.6)  # a few system-metric samples
    tracking.end_run(client, stage)
    run = client.get_run(stage)
    assert run.info.run_name == "fcn16s" and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["data_fingerprint"] == "f" * 16
    assert run.data.params["lr"] == "0.0005" and run.data.params["stage"] == "fcn16s"
    history = client.get_metric_history(stage, "train_loss")
    assert [(m.step, round(m.value, 4)) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.3333)]
    assert client.get_metric_history(stage, "wafers_per_s")[-1].value == 102.0
    assert "note" not in run.data.metrics and "flag" not in run.data.metrics and "epoch" not in run.data.metrics
    assert "system/cpu_utilization_percentage" in run.data.metrics
    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
        tracking.end_run(client, parent, "DONE")
    tracking.end_run(client, parent)


def test_log_files_and_folders(home, client, tmp_path):
    run_id = start_training(client, make_cfg(home))
    (tmp_path / "results.md").write_text("| stage | mean IU |\n")
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    (pictures / "confusion_fcn8s.png").write_bytes(b"\x89PNG")
    logged = tracking.log_files(client, run_id, [tmp_path / "results.md", pictures], artifact_path="eval")
    assert logged == ["eval/results.md", "eval/pictures"]
    names = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert names == {"eval/results.md", "eval/pictures"}
    assert [a.path for a in client.list_artifacts(run_id, "eval/pictures")] == ["eval/pictures/confusion_fcn8s.png"]
    with pytest.raises(FileNotFoundError, match="missing.png"):
        tracking.log_files(client, run_id, [tmp_path / "missing.png"])
    tracking.end_run(client, run_id)


# -- model logging, registry and alias policy -------------------------------------------------------


def test_first_version_is_champion_and_loads_in_fresh_process_at_any_size(home, client, tmp_path):
    cfg = make_cfg(home, registered_model="fcn-fresh")
    run_id = start_training(client, cfg)
    ckpt = write_checkpoint(tmp_path / "best.pt", cfg, seed=1)
    calls = []
    result = tracking.register_model(cfg, client=client, run_id=run_id, checkpoint_path=ckpt,
                                     candidate_score=0.7, rescore=calls.append)
    assert calls == []  # nothing to re-score
    assert (result.version, result.alias, result.champion_score, result.previous_champion_version) == \
        ("1", "champion", None, None)
    assert result.promoted and result.model_uri == "models:/fcn-fresh/1"
    assert client.get_model_version_by_alias("fcn-fresh", "champion").version in (1, "1")

    # reference predictions in this process, from the checkpoint itself
    from fcn_core.checkpoint import load_model
    from fcn_core.inference.packed import predict_maps

    rng = np.random.default_rng(0)
    dies = [rng.integers(0, 3, size=shape).astype(np.uint8) for shape in [(17, 23), (45, 38)]]  # example is 32x32
    reference = predict_maps(load_model(ckpt)[0], dies)
    np.savez(tmp_path / "dies.npz", *dies)
    script = textwrap.dedent(f"""
        import json, numpy as np, torch
        from fcn_core.config import Config
        from fcn_core.inference.packed import predict_maps
        from tasks.tracking import load_champion
        cfg = Config(home={str(home)!r}, tracking={{"registered_model": "fcn-fresh"}})
        model, name, version = load_champion(cfg)
        data = np.load({str(tmp_path / "dies.npz")!r})
        preds = predict_maps(model, [data[k] for k in data.files])
        np.savez({str(tmp_path / "preds.npz")!r}, *preds)
        logits = model(torch.zeros(2, 3, 64, 96))
        print(json.dumps({{"name": name, "version": version, "logits": list(logits.shape)}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info == {"name": "fcn-fresh", "version": "1", "logits": [2, N_CLASSES, 64, 96]}
    preds = np.load(tmp_path / "preds.npz")
    for die, ref, key in zip(dies, reference, preds.files, strict=True):
        got = preds[key]
        assert got.shape == die.shape and got.dtype == np.uint8
        np.testing.assert_array_equal(got, ref)
        assert not got[die != 2].any()  # background off fail dies

    # pyfunc honours the dynamic (-1, 3, -1, -1) signature at another size
    pyfunc = mlflow.pyfunc.load_model("models:/fcn-fresh/1")
    assert np.asarray(pyfunc.predict(np.zeros((1, 3, 96, 64), np.float32))).shape == (1, N_CLASSES, 96, 64)
    # config and class names travel with the model
    model_dir = Path(mlflow.artifacts.download_artifacts("models:/fcn-fresh/1"))
    assert json.loads((model_dir / "extra_files" / "class_names.json").read_text()) == cfg.class_names
    assert yaml.safe_load((model_dir / "extra_files" / "config.yaml").read_text())["tracking"]["registered_model"] \
        == "fcn-fresh"
    tracking.end_run(client, run_id)


def test_alias_policy_worse_model_never_takes_champion(home, client, tmp_path):
    cfg = make_cfg(home, registered_model="fcn-policy")
    ckpt = write_checkpoint(tmp_path / "best.pt", cfg, seed=2)
    rescored: list[torch.nn.Module] = []

    def rescore_as(value: float):
        def rescore(model: torch.nn.Module) -> float:
            assert isinstance(model, torch.nn.Module)
            rescored.append(model)
            return value
        return rescore

    def register(candidate: float, champion_now: float):
        run_id = start_training(client, cfg)
        result = tracking.register_model(cfg, client=client, run_id=run_id, checkpoint_path=ckpt,
                                         candidate_score=candidate, rescore=rescore_as(champion_now))
        return run_id, result

    _, first = register(0.80, champion_now=0.0)
    assert (first.version, first.alias) == ("1", "champion")

    run_id, worse = register(0.60, champion_now=0.75)  # champion re-scored on this test split
    assert (worse.version, worse.alias, worse.previous_champion_version) == ("2", "challenger", "1")
    assert worse.champion_score == 0.75 and not worse.promoted
    assert str(client.get_model_version_by_alias("fcn-policy", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("fcn-policy", "challenger").version) == "2"
    run = client.get_run(run_id)
    assert run.data.tags["registry.decision"] == "challenger" and run.data.tags["registry.version"] == "2"
    assert run.data.metrics["registry/candidate_score"] == 0.60
    assert run.data.metrics["registry/champion_score"] == 0.75
    tags = client.get_model_version("fcn-policy", "2").tags
    assert tags["decision"] == "challenger" and tags["champion_score"] == "0.750000"
    assert tags["candidate_score"] == "0.600000" and tags["previous_champion_version"] == "1"
    assert tags["data_fingerprint"] == "f" * 16

    _, equal = register(0.75, champion_now=0.75)  # ties go to the newer model
    assert (equal.version, equal.alias, equal.previous_champion_version) == ("3", "champion", "1")
    assert str(client.get_model_version_by_alias("fcn-policy", "champion").version) == "3"
    assert len(rescored) == 2
    assert client.get_model_version("fcn-policy", "3").tags["decision"] == "champion"


def test_champion_that_no_longer_loads_is_replaced(home, client, tmp_path):
    cfg = make_cfg(home, registered_model="fcn-broken")
    ckpt = write_checkpoint(tmp_path / "best.pt", cfg, seed=3)
    run_id = start_training(client, cfg)
    tracking.register_model(cfg, client=client, run_id=run_id, checkpoint_path=ckpt, candidate_score=0.9,
                            rescore=lambda m: 0.0)
    source = client.get_model_version("fcn-broken", "1").source
    model_id = source.removeprefix("models:/")
    shutil.rmtree(home / "mlartifacts" / "models" / model_id / "artifacts" / "data")
    result = tracking.register_model(cfg, client=client, run_id=run_id, checkpoint_path=ckpt,
                                     candidate_score=0.1, rescore=lambda m: 1.0)
    assert (result.alias, result.champion_score) == ("champion", None)
    assert "does not load" in client.get_model_version("fcn-broken", "2").tags["decision_reason"]


def test_register_rejects_nan_score(home, client, tmp_path):
    with pytest.raises(ValueError, match="finite"):
        tracking.register_model(make_cfg(home), client=client, run_id="unused", checkpoint_path=tmp_path / "x.pt",
                                candidate_score=float("nan"), rescore=lambda m: 0.0)


def test_load_champion_without_registered_model_says_what_to_do(home, client):
    cfg = make_cfg(home, registered_model="never-trained")
    with pytest.raises(tracking.NoChampionError) as err:
        tracking.load_champion(cfg)
    message = str(err.value)
    assert "never-trained@champion" in message and cfg.tracking_uri in message
    assert "prefect deployment run train-fcn/train-fcn" in message and "make demo" in message


def test_load_model_uri_forms(home, client, tmp_path):
    cfg = make_cfg(home, registered_model="fcn-uris")
    ckpt = write_checkpoint(tmp_path / "best.pt", cfg, seed=4)
    run_id = start_training(client, cfg)
    tracking.register_model(cfg, client=client, run_id=run_id, checkpoint_path=ckpt, candidate_score=0.5,
                            rescore=lambda m: 0.0)
    x = torch.zeros(1, 3, 32, 32)
    expected = tracking.load_champion(cfg)[0](x)
    uri = cfg.tracking_uri
    for model_uri, name, version in [
        ("models:/fcn-uris@champion", "fcn-uris", "1"),
        ("models:/fcn-uris/1", "fcn-uris", "1"),
        ("models:/fcn-uris/latest", "fcn-uris", "1"),
        (f"runs:/{run_id}/model", f"runs:/{run_id}/model", run_id),
        (str(ckpt), str(ckpt), "local"),
    ]:
        model, got_name, got_version = tracking.load_model_uri(model_uri, tracking_uri=uri)
        assert (got_name, got_version) == (name, version), model_uri
        torch.testing.assert_close(model(x), expected)
    with pytest.raises(LookupError, match="no version 7"):
        tracking.load_model_uri("models:/fcn-uris/7", tracking_uri=uri)
    with pytest.raises(tracking.NoChampionError, match="fcn-uris@staging"):
        tracking.load_model_uri("models:/fcn-uris@staging", tracking_uri=uri)
    with pytest.raises(ValueError, match="expected models:/"):
        tracking.load_model_uri(str(tmp_path / "nothing-here"), tracking_uri=uri)


# -- provenance and links -------------------------------------------------------------------------


def test_data_fingerprint_is_stable_and_content_sensitive(tmp_path):
    table = pa.table({"wafer_id": ["a", "b"], "v": [1, 2]})
    for folder in ("one", "two"):
        (tmp_path / folder / "date=2024-01-01").mkdir(parents=True)
        pq.write_table(table, tmp_path / folder / "date=2024-01-01" / "part-0.parquet")
        pq.write_table(table.slice(1), tmp_path / folder / "part-1.parquet")
    one, two = tmp_path / "one", tmp_path / "two"
    fp = tracking.data_fingerprint([str(one)])
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    assert tracking.data_fingerprint([str(two)]) == fp  # location does not matter
    a, b = one / "date=2024-01-01" / "part-0.parquet", one / "part-1.parquet"
    assert tracking.data_fingerprint([str(a), str(b)]) == tracking.data_fingerprint([str(b), str(a)])
    pq.write_table(pa.table({"wafer_id": ["a", "c"], "v": [1, 2]}), two / "date=2024-01-01" / "part-0.parquet")
    assert tracking.data_fingerprint([str(two)]) != fp
    with pytest.raises(ValueError, match="at least one"):
        tracking.data_fingerprint([])
    with pytest.raises(Exception, match="no such file"):
        tracking.data_fingerprint([str(tmp_path / "absent.parquet")])


def test_git_commit_is_a_hash_or_none():
    commit = tracking.git_commit()
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commit)


def test_run_url_only_when_a_ui_is_known(home, client, monkeypatch):
    cfg = make_cfg(home)
    run_id = start_training(client, cfg)
    experiment_id = client.get_run(run_id).info.experiment_id
    assert tracking.run_url(cfg, run_id) is None
    monkeypatch.setenv(tracking.UI_URL_ENV, "http://127.0.0.1:5000/")
    assert tracking.run_url(cfg, run_id) == f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}"
    assert tracking.run_url(cfg, run_id, ui_url="http://mlflow.fab:8080").startswith("http://mlflow.fab:8080/#/")
    tracking.end_run(client, run_id)
