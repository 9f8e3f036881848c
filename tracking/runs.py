"""Training runs: one parent run per training, a nested run per stage, epoch and system metrics.

Everything logs through an explicit client and ``run_id``: MLflow's fluent "active run" is per
thread, and Prefect tasks run on worker threads (or Dask processes).
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import numbers
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric, Param

from fcn_core.config import Config
from fcn_core.stages import stage_title
from tracking.provenance import git_commit
from tracking.store import RetryingClient, experiment_id

log = logging.getLogger(__name__)

UI_URL_ENV = "WAFER_FCN_MLFLOW_UI"  # e.g. http://127.0.0.1:5000 while `mlflow ui` runs

# MLflow limits (mlflow.utils.validation): 100 params per log_batch, 6000 characters per value.
_PARAMS_PER_BATCH = 100
_PARAM_VALUE_MAX = 6000
_RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
_INHERITED_TAGS = ("config_name", "data_fingerprint", "git_commit", "mlflow.source.git.commit", "mlflow.user")

# The epoch dict's validation scores are computed on fail dies only (fcn_core.train): the metric
# keys say so, so a reader of the chart does not take them for whole-wafer scores.
EPOCH_METRIC_KEYS = {"val_mean_iu": "val_fail_mean_iu", "val_pixel_acc": "val_fail_pixel_acc",
                     "val_mean_acc": "val_fail_mean_acc", "val_fw_iu": "val_fail_fw_iu"}

# The runs table's columns: MLflow 3.17 has no per-experiment default, but it restores a view from
# the experiment tag ``mlflow.sharedViewState.<key>`` when the URL carries ``?viewStateShareKey=<key>``
# (the UI's "share view"). ``runs_table_url`` gives that link.
RUNS_VIEW_KEY = "wafer-fcn-scores"
LADDER_VIEW_KEY = "wafer-fcn-ladder"  # the chart view: test scores by stage (step), every training
RUNS_VIEW_COLUMNS = ("test_fail_mean_iu", "test_fail_pixel_acc", "real_macro_f1", "real_accuracy",
                     "registry/candidate_score")

# System-metrics monitors of this process, by run id: end_run stops and flushes them.
_monitors: dict[str, Any] = {}
_monitors_lock = threading.Lock()


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, list | dict) else str(value)
    if len(text) > _PARAM_VALUE_MAX:
        text = text[: _PARAM_VALUE_MAX - 15] + "...[truncated]"
    return text


def log_params(client: RetryingClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(key, _param_value(value)) for key, value in params.items()]
    for start in range(0, len(items), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + _PARAMS_PER_BATCH])


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (some containers)
        return None


def parent_run_name(cfg: Config, data_fingerprint: str, *, when: float | None = None) -> str:
    """``<config>-<YYYY-MM-DD>-<fingerprint[:6]>``: which config, which day, which data (UTC date)."""
    day = time.strftime("%Y-%m-%d", time.gmtime(time.time() if when is None else when))
    return f"{cfg.name}-{day}-{data_fingerprint[:6]}"


def set_shared_view(client: RetryingClient, experiment: str, key: str, state: dict[str, Any]) -> None:
    """Store a runs-page view (columns, order, chart axis) as the experiment's shared view ``key``."""
    value = json.dumps(state, separators=(",", ":"))
    tag = f"mlflow.sharedViewState.{key}"
    if client.get_experiment(experiment).tags.get(tag) != value:
        client.set_experiment_tag(experiment, tag, value)


def shared_view_url(ui_url: str, experiment: str, key: str, *, charts: bool = False) -> str:
    """Link to an experiment's runs page in the shared view ``key`` (the chart view when ``charts``),
    in the UI's "Model training" mode (its side bar otherwise remembers the GenAI mode of a first visit)."""
    mode = "&compareRunsMode=CHART" if charts else ""
    return (f"{ui_url.rstrip('/')}/#/experiments/{experiment}/runs?viewStateShareKey={key}{mode}"
            "&workflowType=machine_learning")


def set_runs_view(client: RetryingClient, experiment: str, *, columns: Iterable[str] = RUNS_VIEW_COLUMNS) -> None:
    """The training experiment's runs table: models, score columns and datasets, newest first."""
    set_shared_view(client, experiment, RUNS_VIEW_KEY, {
        "selectedColumns": ["attributes.`Models`", *(f"metrics.`{key}`" for key in columns), "attributes.`Dataset`"],
        "orderByKey": "attributes.start_time", "orderByAsc": False})


def set_ladder_view(client: RetryingClient, experiment: str) -> None:
    """The training experiment's charts narrowed to the test scores: one line per training, stage on x."""
    set_shared_view(client, experiment, LADDER_VIEW_KEY, {
        "chartsSearchFilter": "test_fail", "orderByKey": "attributes.start_time", "orderByAsc": False,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""}})


def ladder_chart_url(ui_url: str, experiment: str) -> str:
    """Link to :func:`set_ladder_view`'s charts (x: 0 = FCN-32s ... 5 = FCN-1s, 6 = fine-tuned)."""
    return shared_view_url(ui_url, experiment, LADDER_VIEW_KEY, charts=True)


def runs_table_url(ui_url: str, experiment: str) -> str:
    """Link to the training runs table with the score columns of :func:`set_runs_view`."""
    return shared_view_url(ui_url, experiment, RUNS_VIEW_KEY)


def start_parent_run(client: RetryingClient, cfg: Config, *, data_fingerprint: str,
                     run_name: str | None = None) -> str:
    """One run per training, named by :func:`parent_run_name`: full flattened config as params,
    commit/fingerprint tags, config.yaml."""
    commit = git_commit()
    tags: dict[str, str] = {"config_name": cfg.name, "data_fingerprint": data_fingerprint,
                            "wafer_fcn.run_kind": "training"}
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")  # the UI shows this one
    if user := _user():
        tags["mlflow.user"] = user
    experiment = experiment_id(client, cfg)
    set_runs_view(client, experiment)
    set_ladder_view(client, experiment)
    run = client.create_run(experiment, run_name=run_name or parent_run_name(cfg, data_fingerprint), tags=tags)
    run_id = run.info.run_id
    log_params(client, run_id, cfg.flat())
    client.log_text(run_id, cfg.to_yaml(), "config.yaml")
    return run_id


def start_stage_run(client: RetryingClient, cfg: Config, *, parent_run_id: str, stage: str,
                    log_system_metrics: bool = True, sampling_interval: float = 10.0) -> str:
    """A nested run named by the stage's title (``FCN-8s``; tag ``stage`` keeps ``fcn8s``), with that
    stage's settings as params.

    System metrics (``system/cpu_utilization_percentage``, memory, disk, network, GPU when
    pynvml is present) are sampled by a background thread of *this* process that logs to the
    run id directly; it stops at ``end_run`` or, from any process, once the run is terminated.
    """
    parent = client.get_run(parent_run_id)
    tags = {"mlflow.parentRunId": parent_run_id, "stage": stage,
            **{k: v for k, v in parent.data.tags.items() if k in _INHERITED_TAGS}}
    run_id = client.create_run(parent.info.experiment_id, run_name=stage_title(stage), tags=tags).info.run_id
    stage_cfg = getattr(cfg.train, stage, None)
    params: dict[str, Any] = {"stage": stage}
    if hasattr(stage_cfg, "model_dump"):
        params.update(stage_cfg.model_dump(mode="json"))
    log_params(client, run_id, params)
    if log_system_metrics:
        _start_system_metrics(client, run_id, sampling_interval=sampling_interval)
    return run_id


def _start_system_metrics(client: RetryingClient, run_id: str, *, sampling_interval: float) -> None:
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_interval, tracking_uri=client.tracking_uri)
        monitor.start()
    except Exception as exc:  # psutil missing or an unsupported platform: training goes on
        log.warning("system metrics disabled for run %s: %s", run_id, exc)
        return
    with _monitors_lock:
        _monitors[run_id] = monitor


def _stop_system_metrics(run_id: str) -> None:
    with _monitors_lock:
        monitor = _monitors.pop(run_id, None)
    if monitor is not None:
        monitor.finish()  # joins the thread and flushes its last samples


def _numeric(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real | np.generic):
        if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # 0-d tensor/array
            return _numeric(value.item())
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def epoch_logger(client: RetryingClient, run_id: str) -> Callable[[dict], None]:
    """Callback for train_stage: numeric values of an epoch dict -> metrics at step = epoch
    (validation scores renamed by :data:`EPOCH_METRIC_KEYS`: ``val_fail_mean_iu``, ...)."""

    def log_epoch(epoch: dict) -> None:
        step = int(epoch.get("epoch", 0))
        now = int(time.time() * 1000)
        metrics = [Metric(EPOCH_METRIC_KEYS.get(key, key), value, now, step) for key, raw in epoch.items()
                   if key != "epoch" and (value := _numeric(raw)) is not None]
        if metrics:
            client.log_batch(run_id, metrics=metrics)

    return log_epoch


def log_files(client: RetryingClient, run_id: str, paths: Iterable[str | os.PathLike], *,
              artifact_path: str | None = None) -> list[str]:
    """Upload files (or whole folders) as run artifacts; returns their artifact paths."""
    logged: list[str] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"cannot log {path} to MLflow run {run_id}: no such file or folder")
        dest = f"{artifact_path}/{path.name}" if artifact_path else path.name
        if path.is_dir():
            client.log_artifacts(run_id, str(path), dest)
        else:
            client.log_artifact(run_id, str(path), artifact_path)
        logged.append(dest)
    return logged


def end_run(client: RetryingClient, run_id: str, status: str = "FINISHED") -> None:
    if status not in _RUN_STATUSES:
        raise ValueError(f"run status must be one of {', '.join(_RUN_STATUSES)}, got {status!r}")
    _stop_system_metrics(run_id)
    client.set_terminated(run_id, status)


def run_url(cfg: Config, run_id: str, *, ui_url: str | None = None) -> str | None:
    """Link to the run in the MLflow UI, or None when no UI address is known.

    The UI address comes from ``ui_url``, ``$WAFER_FCN_MLFLOW_UI`` (e.g. http://127.0.0.1:5000)
    or an http(s) tracking URI (a server).
    """
    from mlflow.exceptions import MlflowException

    from tracking.store import client

    base = ui_url or os.environ.get(UI_URL_ENV)
    if not base and cfg.tracking_uri.startswith(("http://", "https://")):
        base = cfg.tracking_uri
    if not base:
        return None
    try:
        experiment = client(cfg.tracking_uri).get_run(run_id).info.experiment_id
    except MlflowException:
        return None
    return f"{base.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
