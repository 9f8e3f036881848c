"""tracking/ (store, runs, provenance) against a real embedded SQLite MLflow store (one per module)."""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from fcn_core.config import ClassSpec, Config
from tracking import provenance, runs, store

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv(runs.UI_URL_ENV, raising=False)
        yield tmp_path_factory.mktemp("wafer-fcn-home")


def make_cfg(home: Path, **tracking_options) -> Config:
    return Config(home=str(home), tracking=tracking_options)


@pytest.fixture(scope="module")
def client(home):
    return store.open_store(make_cfg(home))


def start_training(client, cfg: Config) -> str:
    return runs.start_parent_run(client, cfg, data_fingerprint="f" * 16)


# -- store ----------------------------------------------------------------------------------------


def test_open_store_puts_db_and_artifacts_in_home_without_global_state(home, client):
    before = mlflow.get_tracking_uri()
    cfg = make_cfg(home)
    assert cfg.tracking_uri == f"sqlite:///{home / 'mlflow.db'}" and cfg.tracking_uri.startswith("sqlite:////")
    assert (home / "mlflow.db").is_file()
    exp = client.get_experiment_by_name("wafer-fcn")
    assert exp.artifact_location == (home / "mlartifacts").as_uri()
    again = store.open_store(cfg)  # idempotent, and the one client of this URI
    assert again is client and store.client(cfg.tracking_uri) is client
    assert again.get_experiment_by_name("wafer-fcn").experiment_id == exp.experiment_id
    assert "MLFLOW_TRACKING_URI" not in os.environ and mlflow.get_tracking_uri() == before


def test_reader_never_creates_a_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}"
    with pytest.raises(store.StoreMissingError, match="train a model first") as err:
        store.reader(uri)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "nowhere").exists()


def test_deleted_experiment_is_one_clear_error(tmp_path):
    cfg = Config(home=str(tmp_path), tracking={"experiment": "gone"})
    client = store.open_store(cfg)
    client.delete_experiment(client.get_experiment_by_name("gone").experiment_id)
    with pytest.raises(store.StoreError, match="is deleted.*mlflow experiments restore"):
        store.open_store(cfg)


def test_retry_locked_waits_out_a_short_lock_then_gives_one_line():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "done"

    assert store.retry_locked(flaky, tracking_uri="sqlite:///x.db", what="read", delays=(0, 0, 0)) == "done"
    assert len(calls) == 3

    def locked():
        raise RuntimeError("(sqlite3.OperationalError) database is locked\n[SQL: SELECT ...]")

    with pytest.raises(store.StoreLockedError) as err:
        store.retry_locked(locked, tracking_uri="sqlite:///x.db", what="read models:/m", delays=(0, 0))
    assert "\n" not in str(err.value) and "locked by another process through 3 tries" in str(err.value)
    with pytest.raises(KeyError):  # other errors are not retried
        store.retry_locked(lambda: {}["x"], tracking_uri="sqlite:///x.db", what="read", delays=(0,))


def test_a_real_lock_held_by_another_connection(home, client):
    """An exclusive lock on mlflow.db: retried, then released in time -> the call succeeds."""
    db = home / "mlflow.db"
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")

    def query():
        conn = sqlite3.connect(db, timeout=0.05)
        try:
            return conn.execute("SELECT count(*) FROM experiments").fetchone()[0]
        finally:
            conn.close()

    with pytest.raises(store.StoreLockedError):
        store.retry_locked(query, tracking_uri=str(db), what="count", delays=(0.05, 0.05))
    threading.Timer(0.3, lambda: holder.execute("COMMIT")).start()
    assert store.retry_locked(query, tracking_uri=str(db), what="count", delays=(0.2, 0.4, 0.8, 1.6)) >= 1
    holder.close()


# -- runs -----------------------------------------------------------------------------------------


def test_parent_run_params_tags_and_config_artifact(home, client):
    # 40 classes -> > 100 flattened keys: log_batch accepts 100 params per call
    classes = [ClassSpec(id=0, name="background", color="#000000")] + [
        ClassSpec(id=i, name=f"pattern {i}", color="#123456") for i in range(1, 40)
    ]
    cfg = Config(home=str(home), name="many", classes=classes)
    assert len(cfg.flat()) > 100
    run_id = runs.start_parent_run(client, cfg, data_fingerprint="abc123", run_name="train-many")
    run = client.get_run(run_id)
    assert run.info.run_name == "train-many"
    assert run.data.params.keys() == cfg.flat().keys()
    assert run.data.params["train.fcn16s.lr"] == "0.0005"
    assert run.data.params["classes.39.name"] == "pattern 39"
    assert run.data.params["data.source"] == "None"
    assert run.data.tags["data_fingerprint"] == "abc123"
    assert run.data.tags["config_name"] == "many"
    assert run.data.tags.get("git_commit") == provenance.git_commit()
    config_file = Path(client.download_artifacts(run_id, "config.yaml", str(home)))
    assert Config.model_validate(yaml.safe_load(config_file.read_text())) == cfg
    runs.end_run(client, run_id)
    assert client.get_run(run_id).info.status == "FINISHED"


def test_long_param_values_are_truncated_not_rejected(home, client):
    cfg = Config(home=str(home), name="x" * 7000)
    run_id = start_training(client, cfg)
    value = client.get_run(run_id).data.params["name"]
    assert len(value) <= 6000 and value.endswith("...[truncated]")
    runs.end_run(client, run_id, "KILLED")


def test_stage_run_is_nested_with_epoch_and_system_metrics(home, client):
    cfg = make_cfg(home)
    parent = start_training(client, cfg)
    stage = runs.start_stage_run(client, cfg, parent_run_id=parent, stage="fcn16s", sampling_interval=0.1)
    log_epoch = runs.epoch_logger(client, stage)
    for epoch in range(3):
        log_epoch({"stage": "fcn16s", "epoch": epoch, "train_loss": 1.0 / (epoch + 1), "lr": 5e-4,
                   "val_mean_iu": np.float32(0.5 + 0.1 * epoch), "wafers_per_s": torch.tensor(100.0 + epoch),
                   "note": "not a number", "flag": True})
    time.sleep(0.6)  # a few system-metric samples
    runs.end_run(client, stage)
    run = client.get_run(stage)
    assert run.info.run_name == "FCN-16s" and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["stage"] == "fcn16s"
    assert run.data.tags["data_fingerprint"] == "f" * 16
    assert run.data.params["lr"] == "0.0005" and run.data.params["stage"] == "fcn16s"
    history = client.get_metric_history(stage, "train_loss")
    assert [(m.step, round(m.value, 4)) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.3333)]
    assert client.get_metric_history(stage, "wafers_per_s")[-1].value == 102.0
    # validation scores are on fail dies: the key says so
    assert [round(m.value, 4) for m in client.get_metric_history(stage, "val_fail_mean_iu")] == [0.5, 0.6, 0.7]
    assert "val_mean_iu" not in run.data.metrics
    assert "note" not in run.data.metrics and "flag" not in run.data.metrics and "epoch" not in run.data.metrics
    assert "system/cpu_utilization_percentage" in run.data.metrics
    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
        runs.end_run(client, parent, "DONE")
    runs.end_run(client, parent)


def test_log_files_and_folders(home, client, tmp_path):
    run_id = start_training(client, make_cfg(home))
    (tmp_path / "results.md").write_text("| stage | mean IU |\n")
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    (pictures / "confusion_fcn8s.png").write_bytes(b"\x89PNG")
    logged = runs.log_files(client, run_id, [tmp_path / "results.md", pictures], artifact_path="eval")
    assert logged == ["eval/results.md", "eval/pictures"]
    names = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert names == {"eval/results.md", "eval/pictures"}
    assert [a.path for a in client.list_artifacts(run_id, "eval/pictures")] == ["eval/pictures/confusion_fcn8s.png"]
    with pytest.raises(FileNotFoundError, match="missing.png"):
        runs.log_files(client, run_id, [tmp_path / "missing.png"])
    runs.end_run(client, run_id)


def test_run_url_only_when_a_ui_is_known(home, client, monkeypatch):
    cfg = make_cfg(home)
    run_id = start_training(client, cfg)
    experiment_id = client.get_run(run_id).info.experiment_id
    assert runs.run_url(cfg, run_id) is None
    monkeypatch.setenv(runs.UI_URL_ENV, "http://127.0.0.1:5000/")
    assert runs.run_url(cfg, run_id) == f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}"
    assert runs.run_url(cfg, run_id, ui_url="http://mlflow.fab:8080").startswith("http://mlflow.fab:8080/#/")
    runs.end_run(client, run_id)


# -- provenance -----------------------------------------------------------------------------------


def test_data_fingerprint_is_stable_and_content_sensitive(tmp_path):
    table = pa.table({"wafer_id": ["a", "b"], "v": [1, 2]})
    for folder in ("one", "two"):
        (tmp_path / folder / "date=2024-01-01").mkdir(parents=True)
        pq.write_table(table, tmp_path / folder / "date=2024-01-01" / "part-0.parquet")
        pq.write_table(table.slice(1), tmp_path / folder / "part-1.parquet")
    one, two = tmp_path / "one", tmp_path / "two"
    fp = provenance.data_fingerprint([str(one)])
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    assert provenance.data_fingerprint([str(two)]) == fp  # location does not matter
    a, b = one / "date=2024-01-01" / "part-0.parquet", one / "part-1.parquet"
    assert provenance.data_fingerprint([str(a), str(b)]) == provenance.data_fingerprint([str(b), str(a)])
    pq.write_table(pa.table({"wafer_id": ["a", "c"], "v": [1, 2]}), two / "date=2024-01-01" / "part-0.parquet")
    assert provenance.data_fingerprint([str(two)]) != fp
    with pytest.raises(ValueError, match="at least one"):
        provenance.data_fingerprint([])
    with pytest.raises(Exception, match="no such file"):
        provenance.data_fingerprint([str(tmp_path / "absent.parquet")])


def test_git_commit_is_the_checkouts_head_marked_dirty_when_modified(tmp_path, monkeypatch):
    import subprocess

    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "a.txt").write_text("one")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "one")
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path)
    head = git("rev-parse", "HEAD")
    assert provenance.git_commit() == head
    (tmp_path / "a.txt").write_text("two")
    assert provenance.git_commit() == f"{head}-dirty"
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path / "not-a-checkout")
    (tmp_path / "not-a-checkout").mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert provenance.git_commit() is None


def test_a_project_experiment_on_a_database_store_keeps_artifacts_beside_the_training_ones(tmp_path, monkeypatch):
    """Without an SQLite file (a database URI, no server) MLflow would put a new experiment's
    artifacts in ./mlruns of the current folder; the project's other experiments (nightly) go
    beside the training experiment's artifacts instead."""
    cfg = make_cfg(tmp_path / "db-home", experiment="trained-here")
    client = store.open_store(cfg)
    main = client.get_experiment_by_name("trained-here")
    monkeypatch.setattr(store, "artifact_root", lambda cfg: None)  # as for postgresql://...
    monkeypatch.chdir(tmp_path)
    nightly = client.get_experiment(store.experiment_id(client, cfg, name="trained-here-nightly"))
    assert nightly.artifact_location == f"{main.artifact_location.rstrip('/')}/trained-here-nightly"
    assert not (tmp_path / "mlruns").exists()
