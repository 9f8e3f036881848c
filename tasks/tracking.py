"""MLflow 3 tracking and model registry for wafer-fcn (plain functions; Prefect wraps them elsewhere).

Everything here logs through an explicit ``MlflowClient`` and ``run_id``: MLflow's fluent
"active run" is per thread, and Prefect tasks run on worker threads (or Dask processes), so no
function relies on ``mlflow.start_run`` state. The only process-wide state set is the tracking
URI and experiment (``configure``), which ``mlflow.pytorch`` needs to resolve ``models:/`` URIs.

Store layout (embedded default): ``sqlite:////<home>/mlflow.db`` with artifacts in
``<home>/mlartifacts`` beside it. MLflow 3 has no file store; any ``MLFLOW_TRACKING_URI``
(an ``mlflow server``) works too. See docs/mlflow.md.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import math
import numbers
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)
from torch import nn

from fcn_core.config import REPO_ROOT, Config

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT = "model"
ARTIFACTS_DIR = "mlartifacts"
UI_URL_ENV = "WAFER_FCN_MLFLOW_UI"  # e.g. http://127.0.0.1:5000 while `mlflow ui` runs

# MLflow limits (mlflow.utils.validation): 100 params per log_batch, 6000 characters per value.
_PARAMS_PER_BATCH = 100
_PARAM_VALUE_MAX = 6000
_RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
_NOT_FOUND = {ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), "NOT_FOUND"}

# System-metrics monitors started by start_stage_run in this process, stopped by end_run.
_monitors: dict[str, Any] = {}
_monitors_lock = threading.Lock()


class NoChampionError(LookupError):
    """The registry holds no model under the requested name/alias."""


@dataclass(frozen=True)
class RegistrationResult:
    name: str
    version: str
    alias: str  # the alias the new version got: "champion" or "challenger"
    candidate_score: float
    champion_score: float | None  # previous champion re-scored on this run's test split
    previous_champion_version: str | None
    model_uri: str  # models:/<name>/<version>

    @property
    def promoted(self) -> bool:
        return self.alias == CHAMPION


# -- store and experiment -------------------------------------------------------------------------


def _is_not_found(exc: MlflowException) -> bool:
    return exc.error_code in _NOT_FOUND


def _activate(tracking_uri: str) -> None:
    """Point the process-wide MLflow URI (used by mlflow.pytorch and models:/ resolution) here."""
    if mlflow.get_tracking_uri() != tracking_uri:
        # set_tracking_uri also exports MLFLOW_TRACKING_URI, which Config.tracking_uri prefers: restore
        # it so a later config with another home in this process is not sent to this store.
        before = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(tracking_uri)
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


def _sqlite_db_path(tracking_uri: str) -> Path | None:
    # SQLAlchemy form: sqlite:///relative.db or sqlite:////absolute.db (urlparse would keep "//").
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    path = unquote(tracking_uri[len(prefix):].split("?", 1)[0])
    return Path(path).expanduser().resolve() if path and path != ":memory:" else None


def artifact_root(cfg: Config) -> str | None:
    """File URI of the artifact folder beside an SQLite store; None lets a server decide."""
    db = _sqlite_db_path(cfg.tracking_uri)
    return (db.parent / ARTIFACTS_DIR).as_uri() if db else None


def _ensure_experiment(client: MlflowClient, cfg: Config) -> str:
    name = cfg.tracking.experiment
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise RuntimeError(
                f"MLflow experiment {name!r} is deleted in {cfg.tracking_uri}: restore it "
                f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or pick another name"
            )
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(cfg))
    except MlflowException as exc:  # another process created it between our get and create
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return client.get_experiment_by_name(name).experiment_id


def configure(cfg: Config) -> MlflowClient:
    """Open the tracking store of ``cfg``, make sure its experiment exists, return a client."""
    cfg.home_dir.mkdir(parents=True, exist_ok=True)
    uri = cfg.tracking_uri
    db = _sqlite_db_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    _activate(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = _ensure_experiment(client, cfg)
    mlflow.set_experiment(experiment_id=experiment_id)  # where mlflow.pytorch puts logged models
    return client


# -- runs -----------------------------------------------------------------------------------------


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, list | dict) else str(value)
    if len(text) > _PARAM_VALUE_MAX:
        text = text[: _PARAM_VALUE_MAX - 15] + "...[truncated]"
    return text


def _log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(key, _param_value(value)) for key, value in params.items()]
    for start in range(0, len(items), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + _PARAMS_PER_BATCH])


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (some containers)
        return None


def start_parent_run(
    client: MlflowClient, cfg: Config, *, data_fingerprint: str, run_name: str | None = None
) -> str:
    """One run per training: full flattened config as params, commit/fingerprint tags, config.yaml."""
    commit = git_commit()
    tags: dict[str, str] = {
        "config_name": cfg.name,
        "data_fingerprint": data_fingerprint,
        "wafer_fcn.run_kind": "training",
    }
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")  # the UI shows this one
    if user := _user():
        tags["mlflow.user"] = user
    run = client.create_run(
        _ensure_experiment(client, cfg), run_name=run_name or f"train-{cfg.name}", tags=tags
    )
    run_id = run.info.run_id
    _log_params(client, run_id, cfg.flat())
    client.log_text(run_id, cfg.to_yaml(), "config.yaml")
    return run_id


def start_stage_run(
    client: MlflowClient,
    cfg: Config,
    *,
    parent_run_id: str,
    stage: str,
    log_system_metrics: bool = True,
    sampling_interval: float = 10.0,
) -> str:
    """A nested run named after the stage, with that stage's settings as params.

    System metrics (``system/cpu_utilization_percentage``, memory, disk, network, GPU when
    pynvml is present) are sampled by a background thread of *this* process that logs to the
    run id directly; it stops at ``end_run`` or, from any process, once the run is terminated.
    """
    parent = client.get_run(parent_run_id)
    tags = {
        "mlflow.parentRunId": parent_run_id,
        "stage": stage,
        **{k: v for k, v in parent.data.tags.items()
           if k in ("config_name", "data_fingerprint", "git_commit", "mlflow.source.git.commit", "mlflow.user")},
    }
    run = client.create_run(parent.info.experiment_id, run_name=stage, tags=tags)
    run_id = run.info.run_id
    stage_cfg = getattr(cfg.train, stage, None)
    params: dict[str, Any] = {"stage": stage}
    if hasattr(stage_cfg, "model_dump"):
        params.update(stage_cfg.model_dump(mode="json"))
    _log_params(client, run_id, params)
    if log_system_metrics:
        _start_system_metrics(client, run_id, sampling_interval=sampling_interval)
    return run_id


def _start_system_metrics(client: MlflowClient, run_id: str, *, sampling_interval: float) -> None:
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=sampling_interval, tracking_uri=client.tracking_uri
        )
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


def epoch_logger(client: MlflowClient, run_id: str) -> Callable[[dict], None]:
    """Callback for train_stage: numeric values of an epoch dict -> metrics at step = epoch."""

    def log_epoch(epoch: dict) -> None:
        step = int(epoch.get("epoch", 0))
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, value, now, step)
            for key, raw in epoch.items()
            if key != "epoch" and (value := _numeric(raw)) is not None
        ]
        if metrics:
            client.log_batch(run_id, metrics=metrics)

    return log_epoch


def log_files(
    client: MlflowClient, run_id: str, paths: Iterable[str | os.PathLike], *, artifact_path: str | None = None
) -> list[str]:
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


def end_run(client: MlflowClient, run_id: str, status: str = "FINISHED") -> None:
    if status not in _RUN_STATUSES:
        raise ValueError(f"run status must be one of {', '.join(_RUN_STATUSES)}, got {status!r}")
    _stop_system_metrics(run_id)
    client.set_terminated(run_id, status)


def run_url(cfg: Config, run_id: str, *, ui_url: str | None = None) -> str | None:
    """Link to the run in the MLflow UI, or None when no UI address is known.

    The UI address comes from ``ui_url``, ``cfg.tracking.ui_url`` (if the config has one),
    ``$WAFER_FCN_MLFLOW_UI`` (e.g. http://127.0.0.1:5000), or an http(s) tracking URI (a server).
    """
    base = ui_url or getattr(cfg.tracking, "ui_url", None) or os.environ.get(UI_URL_ENV)
    if not base and cfg.tracking_uri.startswith(("http://", "https://")):
        base = cfg.tracking_uri
    if not base:
        return None
    try:
        experiment_id = MlflowClient(tracking_uri=cfg.tracking_uri).get_run(run_id).info.experiment_id
    except MlflowException:
        return None
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


# -- model logging and registry -------------------------------------------------------------------


def _in_channels(model: nn.Module) -> int | None:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else None


def _signature(in_channels: int, n_classes: int):
    """Batch, height and width are dynamic (-1): maps of any size pass pyfunc schema checks."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, in_channels, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_classes, -1, -1))]),
    )


def log_pytorch_model(
    client: MlflowClient, run_id: str, model: nn.Module, model_cfg: Config, *, name: str = MODEL_ARTIFACT
):
    """Log ``model`` on ``run_id`` with pickle serialization (not torch.export, which would pin the
    example's shape), the config and class names as extra files, and a size-agnostic signature.

    Loading needs the ``wafer-fcn`` package importable: the model class is pickled by reference.
    """
    import mlflow.pytorch
    from mlflow.models import Model

    _activate(client.tracking_uri)
    # Model.log files the LoggedModel under the active experiment: make it the run's.
    mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)
    model = model.cpu().eval()
    metadata = {"class_names": model_cfg.class_names, "n_classes": model_cfg.n_classes,
                "pad_multiple": model_cfg.data.pad_multiple, "config_name": model_cfg.name}
    if isinstance(arch := getattr(model, "arch", None), dict):
        metadata["arch"] = arch
    kwargs: dict[str, Any] = {}
    if (channels := _in_channels(model)) is not None:
        kwargs["signature"] = _signature(channels, model_cfg.n_classes)
        kwargs["input_example"] = np.zeros((1, channels, 32, 32), np.float32)
        metadata["in_channels"] = channels
    with tempfile.TemporaryDirectory(prefix="wafer-fcn-model-") as tmp:
        config_file = Path(tmp, "config.yaml")
        config_file.write_text(model_cfg.to_yaml())
        classes_file = Path(tmp, "class_names.json")
        classes_file.write_text(json.dumps(model_cfg.class_names))
        # Model.log takes run_id explicitly (mlflow.pytorch.log_model would need an active run).
        return Model.log(
            artifact_path=None,
            name=name,
            flavor=mlflow.pytorch,
            run_id=run_id,
            pytorch_model=model,
            serialization_format="pickle",
            pickle_module=mlflow.pytorch.mlflow_pytorch_pickle_module,
            extra_files=[str(config_file), str(classes_file)],
            metadata=metadata,
            # explicit requirements: inferring them would load the model in a subprocess (slow)
            pip_requirements=mlflow.pytorch.get_default_pip_requirements() + [f"numpy=={np.__version__}"],
            **kwargs,
        )


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(
            name, description="wafer-fcn per-die defect-pattern segmentation (FCN); see docs/mlflow.md"
        )
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


def _version_by_alias(client: MlflowClient, name: str, alias: str):
    """The version ``name@alias`` points to, or None (stores disagree on the error for a missing alias)."""
    try:
        registered = client.get_registered_model(name)
    except MlflowException as exc:
        if _is_not_found(exc):
            return None
        raise
    version = registered.aliases.get(alias)
    return None if version is None else client.get_model_version(name, str(version))


def _default_loader(path: str | os.PathLike) -> tuple[nn.Module, Config]:
    from fcn_core.checkpoint import load_model  # lazy: pulls in fcn_core.models

    return load_model(path)


def register_model(
    cfg: Config,
    *,
    client: MlflowClient,
    run_id: str,
    checkpoint_path: str | os.PathLike,
    candidate_score: float,
    rescore: Callable[[nn.Module], float],
    loader: Callable[[str | os.PathLike], tuple[nn.Module, Config]] | None = None,
) -> RegistrationResult:
    """Log the checkpoint's model on ``run_id``, register it, and apply the alias policy.

    ``champion`` moves to the new version only if ``candidate_score`` >= the current champion
    re-scored by ``rescore`` (on this run's test split); otherwise the new version becomes
    ``challenger``. The first version ever is champion. A champion that no longer loads cannot
    serve predictions, so it is replaced (the reason is recorded). The decision and both scores
    are logged on the run (tags + metrics) and as tags of the new version.
    """
    if not math.isfinite(candidate_score):
        raise ValueError(f"candidate_score must be a finite number, got {candidate_score}")
    name = cfg.tracking.registered_model
    _activate(client.tracking_uri)
    model, model_cfg = (loader or _default_loader)(checkpoint_path)

    # Re-score the champion before registering anything: a failing rescore leaves no stray version.
    champion = _version_by_alias(client, name, CHAMPION)
    previous = str(champion.version) if champion is not None else None
    champion_score: float | None = None
    reason = "first registered version"
    if champion is not None:
        try:
            import mlflow.pytorch

            champion_model = mlflow.pytorch.load_model(f"models:/{name}/{champion.version}", map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - any load failure means the champion is unusable
            log.warning("champion %s v%s does not load (%s): the new version replaces it", name, champion.version, exc)
            reason = f"champion v{champion.version} does not load: {type(exc).__name__}: {exc}"[:500]
        else:
            champion_score = float(rescore(champion_model.eval()))
            reason = (f"candidate {candidate_score:.4f} {'>=' if candidate_score >= champion_score else '<'} "
                      f"champion v{champion.version} re-scored {champion_score:.4f}")
    promote = champion_score is None or candidate_score >= champion_score
    alias = CHAMPION if promote else CHALLENGER

    info = log_pytorch_model(client, run_id, model, model_cfg)
    _ensure_registered_model(client, name)
    run_tags = client.get_run(run_id).data.tags
    version_tags = {
        "candidate_score": f"{candidate_score:.6f}",
        "champion_score": "" if champion_score is None else f"{champion_score:.6f}",
        "previous_champion_version": previous or "",
        "decision": alias,
        "decision_reason": reason,
        "score_metric": "test mean IU (fail dies)",
        **{k: v for k, v in run_tags.items() if k in ("git_commit", "data_fingerprint", "config_name")},
    }
    mv = client.create_model_version(
        name, source=info.model_uri, run_id=run_id, tags=version_tags, model_id=info.model_id,
        run_link=run_url(cfg, run_id),
    )
    client.set_registered_model_alias(name, alias, str(mv.version))

    now = int(time.time() * 1000)
    metrics = [Metric("registry/candidate_score", float(candidate_score), now, 0)]
    if champion_score is not None:
        metrics.append(Metric("registry/champion_score", champion_score, now, 0))
    tags = [RunTag("registry.model", name), RunTag("registry.version", str(mv.version)),
            RunTag("registry.decision", alias), RunTag("registry.reason", reason),
            RunTag("registry.previous_champion_version", version_tags["previous_champion_version"])]
    client.log_batch(run_id, metrics=metrics, tags=tags)
    return RegistrationResult(
        name=name, version=str(mv.version), alias=alias, candidate_score=float(candidate_score),
        champion_score=champion_score,
        previous_champion_version=previous,
        model_uri=f"models:/{name}/{mv.version}",
    )


# -- loading registered models --------------------------------------------------------------------


def _load(uri: str, device: str):
    import mlflow.pytorch

    return mlflow.pytorch.load_model(uri, map_location=device).to(device).eval()


def load_champion(cfg: Config, *, alias: str = CHAMPION, device: str = "cpu") -> tuple[nn.Module, str, str]:
    """(model, registered name, version) of ``<registered_model>@<alias>`` in cfg's store."""
    return load_model_uri(f"models:/{cfg.tracking.registered_model}@{alias}", tracking_uri=cfg.tracking_uri,
                          device=device)


def _no_model(name: str, alias: str, uri: str) -> NoChampionError:
    return NoChampionError(
        f"no model registered as {name}@{alias} in {uri}: run "
        "`prefect deployment run train-fcn/train-fcn` or `make demo` first"
    )


def load_model_uri(
    uri: str, *, tracking_uri: str | None = None, device: str = "cpu"
) -> tuple[nn.Module, str, str]:
    """Load a model for ``--model URI``: returns (model, name, version).

    ``models:/name@alias`` and ``models:/name/3`` give the registered name and version;
    ``runs:/<run_id>/<path>`` gives (uri, run_id); ``models:/<model_id>`` gives (uri, model_id);
    a checkpoint file (``.pt``) or a local MLflow model folder gives (path, "local").
    """
    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    _activate(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    if uri.startswith("models:/"):
        ref = uri[len("models:/"):].strip("/")
        if "@" in ref:
            name, alias = ref.rsplit("@", 1)
            mv = _version_by_alias(client, name, alias)
            if mv is None:
                raise _no_model(name, alias, tracking_uri)
            return _load(f"models:/{name}/{mv.version}", device), name, str(mv.version)
        if "/" in ref:
            name, version = ref.rsplit("/", 1)
            if version == "latest":
                versions = client.search_model_versions(f"name = '{name}'")
                if not versions:
                    raise _no_model(name, "latest", tracking_uri)
                version = str(max(int(v.version) for v in versions))
            try:
                client.get_model_version(name, version)
            except MlflowException as exc:
                if _is_not_found(exc):
                    raise LookupError(f"no version {version} of registered model {name!r} in {tracking_uri}") from exc
                raise
            return _load(f"models:/{name}/{version}", device), name, version
        return _load(uri, device), uri, ref  # a logged-model id: models:/m-...
    if uri.startswith("runs:/"):
        return _load(uri, device), uri, uri[len("runs:/"):].split("/", 1)[0]
    path = Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser()
    if path.is_file():
        model, _ = _default_loader(path)
        return model.to(device).eval(), str(path), "local"
    if (path / "MLmodel").is_file():
        return _load(str(path), device), str(path), "local"
    raise ValueError(
        f"--model {uri!r}: expected models:/<name>@<alias>, models:/<name>/<version>, runs:/<run_id>/<path>, "
        "a checkpoint file or an MLflow model folder"
    )


# -- provenance -----------------------------------------------------------------------------------


def data_fingerprint(paths: Sequence[str | os.PathLike]) -> str:
    """Stable 16-hex-digit hash of the Parquet inputs: names (relative to each given folder),
    sizes and content hashes. Independent of argument order, absolute location and mtimes."""
    from fcn_core.table import list_parquet_files, resolve_fs

    if not paths:
        raise ValueError("data_fingerprint needs at least one Parquet file or folder")
    entries: list[str] = []
    for source in paths:
        fs, files = list_parquet_files(source)
        _, root = resolve_fs(source)
        single = len(files) == 1 and files[0] == root
        for f in files:
            rel = Path(f).name if single else os.path.relpath(f, root)
            digest = hashlib.sha256()
            size = 0
            with fs.open_input_stream(f) as stream:
                while chunk := stream.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
            entries.append(f"{rel}\t{size}\t{digest.hexdigest()}")
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()[:16]


def git_commit() -> str | None:
    """HEAD commit of the checkout wafer-fcn runs from (suffixed ``-dirty`` when modified)."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit or None
