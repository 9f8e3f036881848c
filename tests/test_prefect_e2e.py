"""End to end against real processes: Prefect server, process worker, deployments, MLflow store.

The local stack (flows.stack) starts `prefect server` on a free loopback port with PREFECT_HOME in a
temporary project home, creates the process work pool, runs `prefect deploy --all`, starts a
worker and the MLflow UI; then the deployments are run the way users run them. Everything started
is stopped at the end, also on failure. About two minutes on two cores.
"""

import datetime as dt
import hashlib
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from fcn_core.config import SynthConfig
from fcn_core.ingest import read_curated
from fcn_core.synth import generate_wafers
from fcn_core.table import write_parquet_atomic
from flows.nightly_inference import NIGHTLY_LOCK
from flows.stack import free_port, stack_down, stack_env, stack_up

pytestmark = pytest.mark.slow

TRAIN = {"config": "tiny", "overrides": {"data.synth.wafers_per_lot": 2}}


def run_deployment(name: str, params: dict, env: dict, *, timeout: float = 240) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "prefect", "deployment", "run", name, "--params", json.dumps({"params": params})]
    return subprocess.run([*argv, "--watch", "--watch-timeout", str(int(timeout))], env=env, capture_output=True,
                          text=True, timeout=timeout + 30)


def digest_predictions(home) -> dict[str, str]:
    """Every file of the predictions folder (the watermark included) but the nightly lock, which
    names its last holder's pid."""
    root = home / "predictions"
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != NIGHTLY_LOCK}


def _worker_log(home) -> str:
    log = home / "stack" / "worker.log"
    return log.read_text(errors="replace") if log.exists() else ""


def test_deployments_train_register_and_score_nightly(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", "2")  # the worker picks runs up quickly
    try:
        info = stack_up(home=home, port=free_port(), mlflow_port=free_port(), echo=print)
        env = stack_env(home=home, api_url=info["prefect_api"])

        # 1. training, as users start it
        done = run_deployment("train-fcn/train-fcn", TRAIN, env)
        assert done.returncode == 0, done.stdout + done.stderr
        client = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")
        champion = client.get_model_version_by_alias("wafer-fcn", "champion")
        assert str(champion.version) == "1"
        assert client.get_run(champion.run_id).info.status == "FINISHED"

        # 2. a fresh production night (no labels), ingested by the nightly flow itself
        night = generate_wafers(30, seed=99, synth=SynthConfig(size_max=40, nights=1), start_date=dt.date(2026, 4, 1))
        night = night.set_column(night.schema.get_field_index("label_map"), "label_map",
                                 pa.nulls(night.num_rows, pa.binary()))
        write_parquet_atomic(night, tmp_path / "night" / "drop.parquet")
        nightly = {"config": "tiny", "source": str(tmp_path / "night")}
        done = run_deployment("nightly-inference/nightly-inference", nightly, env)
        assert done.returncode == 0, done.stdout + done.stderr
        files = sorted((home / "predictions").glob("date=*/predictions.parquet"))
        predicted = [i for f in files for i in pq.read_table(f, columns=["wafer_id"]).column(0).to_pylist()]
        assert len(predicted) == len(set(predicted))  # one row per wafer
        assert set(night.column("wafer_id").to_pylist()) <= set(predicted)
        assert set(predicted) == set(read_curated(home / "curated").column("wafer_id").to_pylist())
        before = digest_predictions(home)

        # 3. the same night again: nothing scored twice, nothing changed
        done = run_deployment("nightly-inference/nightly-inference", nightly, env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert digest_predictions(home) == before

        # 4. the server validates parameters against the flow's pydantic model
        bad = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "train-fcn/train-fcn",
                              "--params", json.dumps({"params": {"config": "tiny", "epochs": 3}})],
                             env=env, capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and "epochs" in bad.stdout + bad.stderr

        # 5. a run started through the API cannot move where models load from or where state lives
        moved = run_deployment("nightly-inference/nightly-inference",
                               {"config": "tiny", "overrides": {"home": str(tmp_path / "elsewhere")}}, env)
        assert moved.returncode != 0
        assert "WAFER_FCN_ALLOWED_OVERRIDES" in moved.stdout + moved.stderr + _worker_log(home)
        assert not (tmp_path / "elsewhere").exists()
    finally:
        stack_down(home=home, echo=print)
    assert list((home / "stack").glob("*.pid")) == []
