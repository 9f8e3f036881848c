"""Shared test set-up: isolated Prefect/MLflow environment, a Prefect test API, a project home."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Before anything imports prefect: never talk to a developer's running server or tracking
    # store, never write to ~/.prefect, never phone home (the test machines are offline).
    for name in ("PREFECT_API_URL", "PREFECT_PROFILE", "MLFLOW_TRACKING_URI", "WAFER_FCN_HOME"):
        os.environ.pop(name, None)
    config._wafer_fcn_prefect_home = tempfile.mkdtemp(prefix="wafer-fcn-test-prefect-")  # type: ignore[attr-defined]
    os.environ["PREFECT_HOME"] = config._wafer_fcn_prefect_home  # type: ignore[attr-defined]
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PREFECT_CLI_PROMPT"] = "false"
    os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"  # tasks called outside a flow
    os.environ["MLFLOW_ENABLE_TELEMETRY"] = "false"
    os.environ["DO_NOT_TRACK"] = "1"


def pytest_unconfigure(config: pytest.Config) -> None:
    # The session's Prefect home (its SQLite database, logs) is scratch: leave no trace in /tmp.
    home = getattr(config, "_wafer_fcn_prefect_home", None)
    if home:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri() -> Iterator[None]:
    """``mlflow.set_tracking_uri`` also exports $MLFLOW_TRACKING_URI, which ``Config.tracking_uri``
    prefers over the home's store: without this, one test's store would leak into the next."""
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect API (SQLite, subprocess server) for the whole session (~10 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def wafer_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project home (``$WAFER_FCN_HOME``): data, MLflow store, predictions go here."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("WAFER_FCN_HOME", str(home))
    return home


def require_real_maps(name: str = "wm811k-val.parquet") -> Path:
    """The real labelled maps ``name`` from the real-data folder (fcn_core.settings). Missing, a test
    that needs them skips on a developer's machine but FAILS in CI ($CI=true): there a skip would
    hide that the real-map checks never ran."""
    from fcn_core.settings import settings

    path = settings().real_maps(name)
    if path is None:
        folder = settings().real_data_dir()
        message = (f"real maps {name} not found in {folder or 'any real-data folder'}: set WAFER_FCN_REAL_DATA "
                   "to the folder that holds them (default ../shared/data beside the checkout)")
        if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def real_maps() -> Path:
    """The real WM-811K validation maps (wm811k-val.parquet); see ``require_real_maps``."""
    return require_real_maps()
