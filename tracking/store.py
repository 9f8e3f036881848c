"""The MLflow store of a config: where it is, opening it, one client per tracking URI.

Embedded default: ``sqlite:////<home>/mlflow.db`` with artifacts in ``<home>/mlartifacts``
beside it; any ``MLFLOW_TRACKING_URI`` (an ``mlflow server``, Postgres) works too. Every call
passes the tracking URI explicitly: nothing here sets MLflow's process-wide URI.

Three failure modes get one clear line instead of a traceback (:class:`StoreError`):
a missing store when only reading (reading never creates one), a store locked by another
process for longer than the retries wait, and a deleted experiment.

MLflow records absolute artifact paths. A home moved as a whole (``mv old new``) is rebased
when opened for writing (:func:`rebase_artifacts`) and read in place before that
(:func:`local_artifact_path`); see docs/mlflow.md.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

if TYPE_CHECKING:  # mlflow is imported where a client is made, not at import (cold start)
    from mlflow import MlflowClient

    from fcn_core.config import Config

ARTIFACTS_DIR = "mlartifacts"
LOCK_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)  # seconds between attempts on a locked store
T = TypeVar("T")


class StoreError(RuntimeError):
    """A problem with the tracking store the user can fix; the message is one line."""


class StoreMissingError(StoreError, LookupError):
    """Reading from a store that does not exist (reading never creates one)."""


class StoreLockedError(StoreError):
    """The store stayed locked by another process through every retry."""


# -- where ---------------------------------------------------------------------------------------


def sqlite_db_path(tracking_uri: str) -> Path | None:
    """The database file of an SQLite tracking URI, else None."""
    # SQLAlchemy form: sqlite:///relative.db or sqlite:////absolute.db (urlparse would keep "//").
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    path = unquote(tracking_uri[len(prefix):].split("?", 1)[0])
    return Path(path).expanduser().resolve() if path and path != ":memory:" else None


def artifact_root(cfg: Config) -> str | None:
    """File URI of the artifact folder beside an SQLite store; None lets a server decide."""
    db = sqlite_db_path(cfg.tracking_uri)
    return (db.parent / ARTIFACTS_DIR).as_uri() if db else None


def require_store(tracking_uri: str) -> None:
    """Raise :class:`StoreMissingError` when an SQLite store's file is absent (a server: assumed there)."""
    db = sqlite_db_path(tracking_uri)
    if db is not None and not db.is_file():
        raise StoreMissingError(f"no MLflow store at {db}: train a model first (`wafer-fcn train` or `make demo`), "
                                "or point --set home=... / MLFLOW_TRACKING_URI at an existing store")


def file_uri_path(uri: str) -> Path | None:
    """Local path of a ``file:`` URI or a plain absolute path, else None."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if parsed.scheme == "" and uri.startswith("/"):
        return Path(uri)
    return None


def local_artifact_path(uri: str, tracking_uri: str) -> Path | None:
    """Where a recorded local artifact URI is on this machine: as recorded, or, when the home was
    moved, the same path under this store's ``mlartifacts``; None for remote artifacts."""
    path = file_uri_path(uri)
    if path is None:
        return None
    db = sqlite_db_path(tracking_uri)
    if path.exists() or db is None or ARTIFACTS_DIR not in path.parts:
        return path
    parts = path.parts
    cut = len(parts) - 1 - parts[::-1].index(ARTIFACTS_DIR)  # the last mlartifacts component
    moved = db.parent / ARTIFACTS_DIR / Path(*parts[cut + 1:]) if cut + 1 < len(parts) else db.parent / ARTIFACTS_DIR
    return moved if moved.exists() else path


# -- locks ---------------------------------------------------------------------------------------


def is_locked(exc: BaseException) -> bool:
    return "database is locked" in str(exc).lower()


def retry_locked(call: Callable[[], T], *, tracking_uri: str, what: str,
                 delays: tuple[float, ...] | None = None) -> T:
    """``call()``, retried with backoff while the store is locked; then one :class:`StoreLockedError` line."""
    delays = LOCK_RETRY_DELAYS if delays is None else delays
    for attempt in range(len(delays) + 1):
        try:
            return call()
        except Exception as exc:
            if not is_locked(exc):
                raise
            if attempt == len(delays):
                raise StoreLockedError(
                    f"{what}: the MLflow store {tracking_uri} stayed locked by another process through "
                    f"{attempt + 1} tries over {sum(delays):.0f} s; try again once that process finishes") from None
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")


class RetryingClient:
    """An ``MlflowClient`` whose calls are retried while an SQLite store is locked."""

    def __init__(self, client: MlflowClient):
        self.mlflow = client
        self.tracking_uri: str = client.tracking_uri

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.mlflow, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return retry_locked(lambda: attr(*args, **kwargs), tracking_uri=self.tracking_uri, what=name)

        return call


_clients: dict[str, RetryingClient] = {}
_clients_lock = threading.Lock()


def client(tracking_uri: str) -> RetryingClient:
    """The one MLflow client of this process for ``tracking_uri`` (MLflow creates an SQLite file
    on first use: callers that only read check :func:`require_store` first)."""
    with _clients_lock:
        if tracking_uri not in _clients:
            from mlflow import MlflowClient

            _clients[tracking_uri] = RetryingClient(MlflowClient(tracking_uri=tracking_uri))
        return _clients[tracking_uri]


# -- opening -------------------------------------------------------------------------------------


# MLflow 3's UI opens an experiment on what its type says; an untyped one lands on the GenAI traces
# page. The accepted values are in the UI bundle (mlflow/server/js): "custom_model_development" opens
# on the runs table, "genai_development" on traces.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def experiment_id(store: RetryingClient, cfg: Config, *, name: str | None = None,
                  kind: str = MODEL_TRAINING_KIND) -> str:
    """Id of the experiment ``name`` (default ``cfg.tracking.experiment``), created (artifacts beside
    an SQLite store) if missing, and typed ``kind`` so the UI opens on its runs (an older untyped
    experiment is typed on first use)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    name = name or cfg.tracking.experiment
    exp = store.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise StoreError(
                f"MLflow experiment {name!r} is deleted in {cfg.tracking_uri}: restore it "
                f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or pick another name")
        if exp.tags.get(EXPERIMENT_KIND_TAG) != kind:
            store.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, kind)
        return exp.experiment_id
    location = artifact_root(cfg)
    if location is None and name != cfg.tracking.experiment:
        # a database store without a server: MLflow would put artifacts in ./mlruns of whatever folder
        # the process runs in; keep them beside the training experiment's (which a team creates first)
        main = store.get_experiment_by_name(cfg.tracking.experiment)
        if main is not None and main.artifact_location:
            location = f"{main.artifact_location.rstrip('/')}/{name}"
    try:
        return store.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: kind})
    except MlflowException as exc:  # another process created it between our get and create
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return store.get_experiment_by_name(name).experiment_id


def open_store(cfg: Config) -> RetryingClient:
    """Open (creating if needed) the store of ``cfg`` for writing, with its experiment; a moved
    home is rebased first. Readers use :func:`reader` instead, which never creates a store."""
    uri = cfg.tracking_uri
    db = sqlite_db_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        if db.is_file():
            retry_locked(lambda: rebase_artifacts(db), tracking_uri=uri, what="rebase artifact paths")
    store = client(uri)
    experiment_id(store, cfg)
    return store


def reader(tracking_uri: str) -> RetryingClient:
    """A client for reading an existing store; :class:`StoreMissingError` when there is none."""
    require_store(tracking_uri)
    return client(tracking_uri)


# -- a moved home --------------------------------------------------------------------------------

# MLflow columns holding absolute artifact locations (the tables exist in every MLflow 3 store)
_LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                     ("logged_models", "artifact_location"), ("model_versions", "source"),
                     ("model_versions", "storage_location"))


def rebase_artifacts(db: Path) -> str | None:
    """If the home holding ``db`` was moved, rewrite the recorded artifact locations that point to
    the old ``<home>/mlartifacts`` (now missing) to this one; returns the old root, or None.

    Only a root that no longer exists is rewritten, so a store whose artifacts deliberately live
    elsewhere (a shared volume, a server) is never touched.
    """
    new_root = (db.parent / ARTIFACTS_DIR).as_uri()
    with closing(sqlite3.connect(db, timeout=5)) as conn, conn:  # commit, then close
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'experiments'").fetchone():
            return None  # a store MLflow has not set up yet
        rows = conn.execute("SELECT artifact_location FROM experiments").fetchall()
        old_roots = {loc for (loc,) in rows if loc and loc.startswith("file:") and loc.rstrip("/").endswith(
            "/" + ARTIFACTS_DIR) and loc.rstrip("/") != new_root}
        old_roots = {root.rstrip("/") for root in old_roots if not (file_uri_path(root) or Path("/")).exists()}
        if not old_roots:
            return None
        for old in old_roots:
            old_path = str(file_uri_path(old))
            new_path = str(db.parent / ARTIFACTS_DIR)
            for table, column in _LOCATION_COLUMNS:
                for prefix, replacement in ((old, new_root), (old_path, new_path)):
                    conn.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "  # noqa: S608
                                 f"WHERE substr({column}, 1, ?) = ?",
                                 (replacement, len(prefix) + 1, len(prefix), prefix))
    return ", ".join(sorted(old_roots))
