"""Crash recovery end to end: ``kill -9`` of ``wafer-fcn train`` mid-cascade, then the same command
again; and two ``wafer-fcn nightly`` at once over the same drop. Real processes, tiny config."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from fcn_core.config import load_config
from fcn_core.synth import generate_wafers
from fcn_core.table import write_parquet_atomic
from tasks import recovery

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def cli_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    env.pop("PREFECT_HOME", None)  # the CLI's default: <home>/prefect, a fresh database per test
    return {**env, "WAFER_FCN_HOME": str(home), "PYTHONPATH": str(REPO), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


# FCN-16s gets a few epochs, so the kill lands inside the stage, after its first checkpoint
TRAIN = ["train", "--set", "train.fcn16s.epochs=4"]


def start_cli(home: Path, *args: str, log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "flows.cli", "-c", "tiny", *args], cwd=REPO,
                                env=cli_env(home), stdout=out, stderr=subprocess.STDOUT)


def wait_for(predicate, *, what: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.2)


def server_children(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True)
            if "tasks.prefect_server" in " ".join(p.cmdline())]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def crashed_and_rerun(tmp_path_factory) -> dict:
    """Train, kill -9 once FCN-16s has its first checkpoint, train again; what each step left behind."""
    home = tmp_path_factory.mktemp("recovery") / "home"
    home.mkdir()
    first_log, second_log = home.parent / "first.log", home.parent / "second.log"
    first = start_cli(home, *TRAIN, log=first_log)
    try:
        wait_for(lambda: any((home / "runs").glob("*/checkpoints/fcn16s/last.pt")) or first.poll() is not None,
                 what="the first training's first FCN-16s checkpoint")
        assert first.poll() is None, first_log.read_text()[-3000:]
        servers = server_children(first.pid)
        server_port = int(servers[0].cmdline()[-1])
        first.send_signal(signal.SIGKILL)
        first.wait()
        checkpoint_32s = next((home / "runs").glob("*/checkpoints/fcn32s/last.pt"))
        stamp_32s = checkpoint_32s.stat().st_mtime_ns
        wait_for(lambda: not any(s.is_running() and s.status() != psutil.STATUS_ZOMBIE for s in servers)
                 and not port_open(server_port), what="the killed CLI's Prefect server to go", seconds=15)
    finally:
        if first.poll() is None:
            first.kill()
    second = subprocess.run([sys.executable, "-m", "flows.cli", "-c", "tiny", *TRAIN], cwd=REPO,
                            env=cli_env(home), capture_output=True, text=True, timeout=600)
    second_log.write_text(second.stdout + second.stderr)
    return {"home": home, "second": second, "log": second.stdout + second.stderr, "checkpoint_32s": checkpoint_32s,
            "stamp_32s": stamp_32s, "first_pid": first.pid}


def test_a_killed_training_leaves_no_server_and_the_rerun_resumes_it(crashed_and_rerun):
    r = crashed_and_rerun
    assert r["second"].returncode == 0, r["log"][-3000:]
    # the same run folder, FCN-32s not trained again, the folder now marked complete
    assert r["checkpoint_32s"].stat().st_mtime_ns == r["stamp_32s"]
    assert f"[fcn32s] resuming from {r['checkpoint_32s']}" in r["log"]
    assert "[fcn16s] resuming from " in r["log"]
    assert "resuming an interrupted training" in r["log"]
    run_dirs = [p for p in (r["home"] / "runs").iterdir() if p.is_dir()]
    assert len(run_dirs) == 1 and (run_dirs[0] / recovery.COMPLETE_MARKER).exists()


def test_the_rerun_marks_the_killed_runs_and_frees_the_gpu_slot(crashed_and_rerun):
    r = crashed_and_rerun
    home = r["home"]
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("wafer-fcn").experiment_id])
    killed = [run for run in runs if run.data.tags.get(recovery.PID_TAG) == str(r["first_pid"])]
    status = {run.data.tags.get("stage", "parent"): run.info.status for run in killed}
    assert status["fcn32s"] == "FINISHED"  # it ended before the kill
    assert status["parent"] == "KILLED" and "RUNNING" not in status.values()
    assert all(run.info.status in ("FINISHED", "KILLED") for run in runs)
    with sqlite3.connect(home / "prefect" / "prefect.db") as db:
        states = dict(db.execute("select tags, state_type from flow_run").fetchall())
        slots = db.execute("select active_slots from concurrency_limit_v2 where name = 'gpu-0'").fetchone()
    first = f"{recovery.PROCESS_TAG_PREFIX}{socket.gethostname()}:{r['first_pid']}"
    assert [state for tags, state in states.items() if first in json.loads(tags)] == ["CRASHED"]
    assert sorted(states.values()) == ["COMPLETED", "CRASHED"]
    assert slots == (0,)
    assert not list((home / "prefect" / "wafer-fcn" / "slots" / "gpu-0").glob("*.json"))


def test_two_nightly_runs_at_once_score_each_wafer_once(crashed_and_rerun, tmp_path):
    home = crashed_and_rerun["home"]
    assert crashed_and_rerun["second"].returncode == 0  # a champion to score with
    cfg = load_config("tiny")
    night = generate_wafers(300, seed=99, synth=cfg.data.synth.model_copy(update={"nights": 3}), classes=cfg.classes)
    night = night.set_column(0, "wafer_id", pa.array([f"night-{i:05d}" for i in range(night.num_rows)]))
    drop = write_parquet_atomic(night, tmp_path / "night.parquet")
    runs = [start_cli(home, "nightly", "--source", str(drop), log=tmp_path / f"nightly-{i}.log") for i in range(2)]
    for run in runs:
        run.wait(timeout=600)
    logs = [(tmp_path / f"nightly-{i}.log").read_text() for i in range(2)]
    assert [run.returncode for run in runs] == [0, 0], logs
    scored = sorted(int(line.split(":", 1)[1].split("wafers scored")[0].replace(",", ""))
                    for text in logs for line in text.splitlines() if "wafers scored in" in line)
    # every curated wafer (the training's and tonight's) scored once, by one run; the other found it done
    ids = [i for f in sorted((home / "predictions").glob("date=*/predictions.parquet"))
           for i in pq.read_table(f, columns=["wafer_id"]).column("wafer_id").to_pylist()]
    assert len(ids) == len(set(ids))
    assert set(night.column("wafer_id").to_pylist()) <= set(ids)
    assert scored == [0, len(ids)]
