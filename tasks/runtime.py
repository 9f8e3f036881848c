"""Prefect plumbing shared by the tasks and flows: result storage, the GPU limit, task runners.

Nothing here knows about wafers; it turns project settings (the home dir, a runner name) into
Prefect objects, so the flows stay readable.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from prefect import Task
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

TaskRunnerName = Literal["threads", "dask"]
RESULTS_DIRNAME = "prefect-results"
DEFAULT_GPU_LIMIT = "gpu-0"
# A holder renews its lease every 3/4 of this; a dead one's slot comes back when the server's
# repossessor sees the lease expired (prefect server start), or at once when the next start on
# this host proves the holder dead (tasks.recovery). 60 s is the server's minimum.
SLOT_LEASE_SECONDS = 120.0
SLOT_POLL_SECONDS = 2.0

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
    Without a limit Prefect grants every request (``concurrency`` only logs a warning), so two
    trainings would share a GPU; creating it here makes the default safe.
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


class SlotWaitInterrupted(KeyboardInterrupt):
    """Ctrl-C while waiting for a concurrency slot (nothing was acquired). A KeyboardInterrupt, so
    Prefect marks the flow run CRASHED with one line ("aborted by an interrupt signal")."""


@contextmanager
def gpu_slot(name: str, *, flow_run_id: str | None = None, info: Callable[[str], None] = log.info,
             lease_seconds: float = SLOT_LEASE_SECONDS, poll_seconds: float = SLOT_POLL_SECONDS) -> Iterator[None]:
    """Hold one slot of the global concurrency limit ``name`` (created with one slot if missing).

    Unlike ``prefect.concurrency.sync.concurrency`` this waits in the calling thread, so Ctrl-C
    stops the wait (``SlotWaitInterrupted``), says once what it waits for, and first releases the
    slots of holders on this host that are provably dead (a killed training). The slot is a Prefect
    lease renewed by a background thread; it is released on exit and recorded under the Prefect home
    while held, so the next start can tell a dead holder from a live one.
    """
    from uuid import UUID

    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder

    from tasks import recovery

    ensure_concurrency_limit(name)
    holder = ConcurrencyLeaseHolder(type="flow_run", id=UUID(flow_run_id)) if flow_run_id else None
    with get_client(sync_client=True) as client:
        recovery.release_dead_holders(client, name)
        waited = False
        try:
            while True:
                try:
                    response = client.increment_concurrency_slots_with_lease(
                        names=[name], slots=1, mode="concurrency", lease_duration=lease_seconds, holder=holder)
                    break
                except httpx.HTTPStatusError as exc:
                    if exc.response.status_code != 423:
                        raise
                if not waited:
                    others = [f"pid {h['pid']} on {h['host']}" for h in recovery.read_holders(name)]
                    info(f"waiting for a free slot of global concurrency limit {name!r} (held by "
                         f"{', '.join(others) or 'a process on another host'}); Ctrl-C stops waiting")
                    waited = True
                time.sleep(poll_seconds)
                recovery.release_dead_holders(client, name)
        except KeyboardInterrupt:
            raise SlotWaitInterrupted(f"interrupted while waiting for concurrency limit {name!r}") from None
        lease_id = UUID(response.json()["lease_id"])
        record = recovery.record_holder(name, lease_id, flow_run_id=flow_run_id or "")
        if waited:
            info(f"got the slot of {name!r}")
        stop = threading.Event()
        renewer = threading.Thread(target=_renew_lease, args=(lease_id, lease_seconds, stop), daemon=True,
                                   name=f"lease-{name}")
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join(timeout=10)
            client.release_concurrency_slots_with_lease(lease_id)
            record.unlink(missing_ok=True)


def _renew_lease(lease_id, lease_seconds: float, stop: threading.Event) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        while not stop.wait(lease_seconds * 0.75):
            try:
                client.renew_concurrency_lease(lease_id=lease_id, lease_duration=lease_seconds)
            except Exception as exc:  # a transient API error: the next renewal may still make it
                log.warning("renewing the concurrency lease %s failed: %s", lease_id, exc)


@contextmanager
def file_lock(path: Path, *, what: str, info: Callable[[str], None] = log.info,
              poll_seconds: float = 1.0) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing), saying once that we wait.

    The kernel drops the lock when its holder dies, ``kill -9`` included: no stale lock to clean.
    One host only (``flock`` on network file systems is not to be trusted).
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    holder = path.read_text().strip() or "another process"
                    info(f"waiting for {what}: {path} is held by {holder}")
                    waited = True
                time.sleep(poll_seconds)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        if waited:
            info(f"got {what}")
        yield
    finally:
        os.close(fd)  # drops the lock


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
