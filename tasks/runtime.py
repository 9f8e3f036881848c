"""Prefect plumbing shared by the tasks and flows: result storage, the GPU limit, task runners.

Nothing here knows about wafers; it turns project settings (the home dir, a runner name) into
Prefect objects, so the flows stay readable.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from prefect import Task
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

TaskRunnerName = Literal["threads", "dask"]
RESULTS_DIRNAME = "prefect-results"
DEFAULT_GPU_LIMIT = "gpu-0"

log = logging.getLogger(__name__)


def result_storage(home: Path) -> Path:
    """Persisted task results (and cache keys) live under the project home, beside the data.

    A Path (not an unsaved LocalFileSystem block) needs no block document on the server.
    """
    path = Path(home).expanduser().resolve() / RESULTS_DIRNAME
    path.mkdir(parents=True, exist_ok=True)
    return path


def persisted(task: Task, home: Path) -> Task:
    """``task`` with its results persisted under ``home``: required for its cache to work."""
    return task.with_options(persist_result=True, result_storage=result_storage(home))


def ensure_concurrency_limit(name: str, *, limit: int = 1) -> bool:
    """Create the global concurrency limit ``name`` with ``limit`` slots unless it exists.

    An existing limit is left as an operator configured it. Returns True when it was created.
    Without a limit ``prefect.concurrency.sync.concurrency`` only logs a warning and does not
    wait, so two trainings would share a GPU; creating it here makes the default safe.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
        except ObjectAlreadyExists:  # another flow run created it meanwhile
            return False
    log.info("created global concurrency limit %r with %d slot(s)", name, limit)
    return True


def make_task_runner(
    name: TaskRunnerName, *, dask_address: str | None = None, dask_workers: int = 2
) -> TaskRunner:
    """Threads (default, in-process) or Dask: a temporary local cluster, or ``dask_address``.

    The local cluster uses threads in one process (``processes=False``): scoring is torch code
    that releases the GIL, and workers share the process's already-loaded model. Point
    ``dask_address`` at a real scheduler to fan out over machines.
    """
    if name == "threads":
        return ThreadPoolTaskRunner(max_workers=dask_workers)
    if name == "dask":
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        # dashboard on loopback, any free port: concurrent flow runs must not fight over :8787
        return DaskTaskRunner(cluster_kwargs={"n_workers": dask_workers, "threads_per_worker": 1,
                                              "processes": False, "dashboard_address": "127.0.0.1:0"})
    raise ValueError(f"unknown task runner {name!r}; expected 'threads' or 'dask'")
