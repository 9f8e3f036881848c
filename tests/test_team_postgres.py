"""Team mode on a real database: Prefect server and MLflow tracking store on PostgreSQL 15.

The test owns a throw-away PostgreSQL server (initdb in a temporary folder, loopback TCP on a
free port, its unix socket in that folder; run as the ``postgres`` OS user when the tests run as
root, since postgres refuses root). ``flows.stack.stack_up`` then starts the Prefect server with
``PREFECT_SERVER_DATABASE_CONNECTION_URL`` on Postgres, the MLflow UI on the Postgres tracking
store, the process work pool, ``prefect deploy --all`` and a worker, exactly as ``wafer-fcn stack
up`` does; the flows reach MLflow through ``MLFLOW_TRACKING_URI=postgresql+psycopg2://``.

Checked: a tiny ``train-fcn`` run through the deployment registers a version aliased champion;
a ``nightly-inference`` deployment run scores one row per valid wafer, no duplicates; two
nightly runs started at once (CLI runs against the same server and home, outside the
deployment's concurrency limit) score every new partition exactly once. Everything is stopped
at the end, also on failure: worker, UI and Prefect server first, Postgres last.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fcn_core.config import REPO_ROOT, SynthConfig, load_config
from fcn_core.ingest import ingest, list_partitions, read_curated
from fcn_core.synth import generate_wafers
from fcn_core.table import write_parquet_atomic
from flows.stack import free_port, stack_down, stack_env, stack_up

pytestmark = pytest.mark.slow


def _pg_bin() -> Path:
    """$WAFER_FCN_PG_BIN, else Debian's PostgreSQL 15, else the newest Debian PostgreSQL installed."""
    if os.environ.get("WAFER_FCN_PG_BIN"):
        return Path(os.environ["WAFER_FCN_PG_BIN"])
    preferred = Path("/usr/lib/postgresql/15/bin")
    if (preferred / "initdb").exists():
        return preferred
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    return found[-1].parent if found else preferred


PG_BIN = _pg_bin()
TRAIN = {"config": "tiny", "overrides": {"data.synth.wafers_per_lot": 2, "train.final_stage": "fcn8s"}}
NIGHTLY_TIMEOUT = 240


# -- a PostgreSQL server owned by the test ------------------------------------------------------------
@dataclass
class Postgres:
    root: Path  # data/, sock/, server.log
    port: int
    password: str
    as_postgres: list[str]  # prefix that runs a command as the server's OS user

    def url(self, database: str, driver: str = "") -> str:
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://wafer:{self.password}@127.0.0.1:{self.port}/{database}"

    def run(self, *argv: str, timeout: float = 120) -> None:
        done = subprocess.run([*self.as_postgres, *argv], capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            log_file = self.root / "server.log"
            log = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stdout}{done.stderr}\n{log}")


def _postgres_or_skip() -> list[str]:
    """The command prefix that runs PostgreSQL's tools, or skip with the reason it cannot run here."""
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"PostgreSQL is not installed ({PG_BIN}/initdb missing): `apt-get install postgresql` "
                    "(.ci/run does it when apt-get is available), or set WAFER_FCN_PG_BIN")
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser") is None:
        pytest.skip("running as root without `runuser`: cannot start postgres as an unprivileged user")
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no `postgres` OS user to run the server as")
    return ["runuser", "-u", "postgres", "--"]


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    prefix = _postgres_or_skip()
    # Not pytest's tmp_path: its parents are root-only (0700), the postgres user could not enter them.
    root = Path(tempfile.mkdtemp(prefix="wafer-fcn-pg-"))
    pg = Postgres(root=root, port=free_port(), password=secrets.token_hex(12), as_postgres=prefix)
    (root / "sock").mkdir()
    (root / "pwfile").write_text(pg.password + "\n")
    if prefix:
        shutil.chown(root, "postgres", "postgres")
        for child in root.iterdir():
            shutil.chown(child, "postgres", "postgres")
    started = False
    try:
        # Unix socket: trust (the socket folder is private to the server's user); TCP: passwords.
        pg.run(str(PG_BIN / "initdb"), "-D", str(root / "data"), "-U", "postgres", "--pwfile", str(root / "pwfile"),
               "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
        # A scratch server: durability settings off (nothing here survives the test anyway).
        options = (f"-h 127.0.0.1 -p {pg.port} -k {root / 'sock'} -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off")
        try:
            pg.run(str(PG_BIN / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "server.log"), "-w", "-t", "60",
                   "-o", options, "start")
        except RuntimeError as exc:
            pytest.skip(f"PostgreSQL is installed but does not start on this machine: {exc}")
        started = True
        sql = [f"CREATE ROLE wafer LOGIN PASSWORD '{pg.password}'",
               "CREATE DATABASE prefect OWNER wafer", "CREATE DATABASE mlflow OWNER wafer"]
        pg.run(str(PG_BIN / "psql"), "-h", str(root / "sock"), "-p", str(pg.port), "-U", "postgres", "-d", "postgres",
               "-v", "ON_ERROR_STOP=1", *[arg for s in sql for arg in ("-c", s)])
        yield pg
    finally:
        if started:
            pg.run(str(PG_BIN / "pg_ctl"), "-D", str(root / "data"), "-m", "fast", "-w", "-t", "60", "stop")
        shutil.rmtree(root, ignore_errors=True)


# -- the team stack on it -------------------------------------------------------------------------------
@dataclass
class TeamStack:
    home: Path
    env: dict[str, str]  # what a team member's shell exports: PREFECT_API_URL, MLFLOW_TRACKING_URI, ...
    api: str
    tracking_uri: str
    artifacts: Path


@pytest.fixture(scope="module")
def team(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TeamStack]:
    from mlflow import MlflowClient

    base = tmp_path_factory.mktemp("team")
    home, artifacts = base / "home", base / "artifacts"
    tracking_uri = postgres.url("mlflow", "psycopg2")  # SQLAlchemy 2.1 defaults to psycopg 3
    # With a database URI (no `mlflow server` in between) an experiment created on the fly would put
    # its artifacts in ./mlruns of the worker's working directory (the checkout): a team creates the
    # experiment once with its artifact location (`mlflow experiments create -n wafer-fcn -l ...`).
    client = MlflowClient(tracking_uri=tracking_uri)
    client.create_experiment(load_config("tiny").tracking.experiment, artifact_location=artifacts.as_uri())

    with pytest.MonkeyPatch.context() as mp:  # inherited by every process the stack starts
        mp.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", postgres.url("prefect", "asyncpg"))
        mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        mp.setenv("PREFECT_WORKER_QUERY_SECONDS", "2")  # the worker picks runs up quickly
        try:
            info = stack_up(home=home, port=free_port(), mlflow_port=free_port(), echo=print)
            env = stack_env(home=home, api_url=info["prefect_api"])
            env["COLUMNS"] = "200"
            assert info["tracking_uri"] == tracking_uri  # the UI serves the Postgres store
            yield TeamStack(home=home, env=env, api=info["prefect_api"], tracking_uri=tracking_uri,
                            artifacts=artifacts)
        finally:
            stack_down(home=home, echo=print)  # worker, MLflow UI, then the server; Postgres after
    assert list((home / "stack").glob("*.pid")) == []


def run_deployment(name: str, params: dict, env: dict, *, timeout: float = NIGHTLY_TIMEOUT) -> None:
    argv = [sys.executable, "-m", "prefect", "deployment", "run", name, "--params", json.dumps({"params": params}),
            "--watch", "--watch-timeout", str(int(timeout))]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout + 30)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def trained(team: TeamStack) -> TeamStack:
    run_deployment("train-fcn/train-fcn", TRAIN, team.env, timeout=600)
    return team


def write_night(folder: Path, *, seed: int, wafers: int, day: dt.date, nights: int = 1,
                duplicates: int = 0) -> pa.Table:
    """A production drop (no labels); ``duplicates`` rows repeat wafer ids and must be quarantined."""
    night = generate_wafers(wafers, seed=seed, synth=SynthConfig(size_max=40, nights=nights), start_date=day)
    night = night.set_column(night.schema.get_field_index("label_map"), "label_map",
                             pa.nulls(night.num_rows, pa.binary()))
    drop = pa.concat_tables([night, night.slice(0, duplicates)]) if duplicates else night
    write_parquet_atomic(drop, folder / f"drop-{seed}.parquet")
    return night


def predicted_ids(home: Path) -> list[str]:
    files = sorted((home / "predictions").glob("date=*/predictions.parquet"))
    return [i for f in files for i in pq.read_table(f, columns=["wafer_id"]).column(0).to_pylist()]


def assert_one_row_per_valid_wafer(home: Path) -> list[str]:
    predicted = predicted_ids(home)
    assert len(predicted) == len(set(predicted)), "a wafer has two prediction rows"
    assert set(predicted) == set(read_curated(home / "curated").column("wafer_id").to_pylist())
    return predicted


def scoring_task_runs(api: str, since: dt.datetime) -> list[str]:
    """Names of the COMPLETED ``score_partition`` task runs started after ``since``: one per partition scored."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterStartTime
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.scoring import score_partition

    async def read() -> list:
        async with get_client() as client:
            return await client.read_task_runs(task_run_filter=TaskRunFilter(
                start_time=TaskRunFilterStartTime(after_=since)))

    with temporary_settings({PREFECT_API_URL: api}):
        runs = asyncio.run(read())
    return sorted(r.name for r in runs
                  if r.task_key == score_partition.task_key and r.state is not None and r.state.is_completed())


# -- the checks -----------------------------------------------------------------------------------------
def test_train_through_the_deployment_registers_a_champion_in_postgres(trained: TeamStack):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=trained.tracking_uri)
    champion = client.get_model_version_by_alias("wafer-fcn", "champion")
    assert str(champion.version) == "1"
    assert client.get_run(champion.run_id).info.status == "FINISHED"
    assert any(trained.artifacts.rglob("*")), "the model's artifacts are not in the experiment's location"
    assert not (REPO_ROOT / "mlruns").exists(), "artifacts leaked into the checkout"


def test_nightly_deployment_scores_each_valid_wafer_once(trained: TeamStack, tmp_path: Path):
    night = write_night(tmp_path / "drops", seed=99, wafers=40, day=dt.date(2026, 4, 1), duplicates=3)
    params = {"config": "tiny", "source": str(tmp_path / "drops")}
    since = dt.datetime.now(dt.timezone.utc)
    run_deployment("nightly-inference/nightly-inference", params, trained.env)
    predicted = assert_one_row_per_valid_wafer(trained.home)
    # the first nightly scores every curated partition (training's and tonight's) once
    assert len(scoring_task_runs(trained.api, since)) == len(list_partitions(trained.home / "curated"))
    assert set(night.column("wafer_id").to_pylist()) <= set(predicted)  # the 3 repeated ids: quarantined

    since = dt.datetime.now(dt.timezone.utc)
    run_deployment("nightly-inference/nightly-inference", params, trained.env)  # the same night again
    assert scoring_task_runs(trained.api, since) == []
    assert sorted(predicted_ids(trained.home)) == sorted(predicted)
    assert not (REPO_ROOT / "mlruns").exists(), "nightly artifacts leaked into the checkout"


def test_two_nightly_runs_at_once_score_each_partition_once(trained: TeamStack, tmp_path: Path):
    cfg = load_config("tiny", {"home": str(trained.home)})
    before = set(predicted_ids(trained.home))
    night = write_night(tmp_path / "drops", seed=7, wafers=300, day=dt.date(2026, 5, 1), nights=3)
    report = ingest(tmp_path / "drops", trained.home / "curated", n_classes=cfg.n_classes, split=cfg.data.split)
    new_partitions = set(report.partitions)
    assert report.rows_valid == night.num_rows and len(new_partitions) == 3

    # Two engineers (or a schedule and an engineer) start `wafer-fcn nightly` against the same server
    # and home at the same moment; the deployment's concurrency limit does not cover CLI runs.
    since = dt.datetime.now(dt.timezone.utc)
    argv = [sys.executable, "-m", "flows.cli", "-c", "tiny", "nightly"]
    runs = [subprocess.Popen(argv, env=trained.env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for _ in range(2)]
    outputs = []
    for run in runs:
        try:
            outputs.append(run.communicate(timeout=NIGHTLY_TIMEOUT)[0])
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
    assert [run.returncode for run in runs] == [0, 0], "\n".join(outputs)

    predicted = assert_one_row_per_valid_wafer(trained.home)
    assert set(predicted) - before == set(night.column("wafer_id").to_pylist())
    # Each new partition scored by exactly one task run across both flow runs. This needs the nightly
    # lock (issue #16 item 6, the "recovery" branch): without it both runs plan the same partitions
    # and, when they overlap, this finds 5 or 6 task runs for 3 partitions (seen before the lock).
    scored = scoring_task_runs(trained.api, since)
    assert len(scored) == len(new_partitions), f"{len(scored)} partition scorings for {len(new_partitions)} " \
                                               f"partitions:\n" + "\n".join(outputs)
