"""Recovery after a crash (``kill -9``, OOM, a reboot): whose process is provably dead, and what to
tidy up for it on the next start.

A record is ``{"host", "pid", "started"}`` (``started``: the process start time from /proc, so a
recycled pid is not mistaken for the old process). A holder is *provably dead* only when it ran
on this host and that process is gone; holders on other hosts are never touched here (their GPU
lease expires on the server, see docs/orchestration.md).

What is tidied, all from the next training's start:

* GPU slots: every slot holder writes a small file under ``<prefect home>/wafer-fcn/slots/<limit>/``;
  a dead holder's lease is released by its id (``decrement-with-lease``: a no-op when the server
  already revoked it, so a slot is never freed twice).
* MLflow: runs of the experiment still ``RUNNING`` whose ``wafer_fcn.host``/``wafer_fcn.pid`` tags
  name a dead process of this host are set ``KILLED``.
* Prefect: ``train-fcn`` flow runs still ``RUNNING`` whose ``wafer_fcn.process=<host>:<pid>`` tag
  (set by the flow itself at its start) names a dead process become ``CRASHED``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from uuid import UUID

log = logging.getLogger(__name__)

HOST_TAG, PID_TAG, STARTED_TAG = "wafer_fcn.host", "wafer_fcn.pid", "wafer_fcn.pid_started"


# -- processes --------------------------------------------------------------------------------------
def this_host() -> str:
    return socket.gethostname()


def process_started(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), None where /proc is unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def this_process() -> dict:
    pid = os.getpid()
    return {"host": this_host(), "pid": pid, "started": process_started(pid)}


def process_alive(pid: int, started: str | None = None) -> bool:
    """True when ``pid`` runs on this host (and, given ``started``, is the same process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, not ours to judge
        return True
    if process_state(pid) in ("Z", "X"):  # a zombie (killed, not reaped yet) is dead
        return False
    if started is not None:
        now = process_started(pid)
        return now is None or now == started
    return True


def process_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def provably_dead(record: dict) -> bool:
    """Only a process of *this* host whose pid is gone (or recycled) is provably dead."""
    try:
        pid = int(record["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if record.get("host") != this_host():
        return False
    return not process_alive(pid, record.get("started"))


# -- GPU slot holders -------------------------------------------------------------------------------
def holders_dir(limit: str) -> Path:
    """Where this host's slot holders of ``limit`` are recorded: beside Prefect's own state."""
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home).expanduser() / "wafer-fcn" / "slots" / limit


def record_holder(limit: str, lease_id: UUID | str, **extra: str) -> Path:
    folder = holders_dir(limit)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{lease_id}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**this_process(), "lease_id": str(lease_id), "acquired": time.time(), **extra}))
    os.replace(tmp, path)
    return path


def read_holders(limit: str) -> list[dict]:
    holders = []
    for path in sorted(holders_dir(limit).glob("*.json")):
        try:
            holders.append({**json.loads(path.read_text()), "path": str(path)})
        except (OSError, ValueError):  # half-written by a killed process: its lease expires on its own
            continue
    return holders


def release_dead_holders(client, limit: str) -> list[dict]:
    """Release the leases of ``limit``'s holders that are provably dead; returns those holders.

    ``client`` is a sync Prefect client. Releasing by lease id is idempotent on the server.
    """
    released = []
    for holder in read_holders(limit):
        if not provably_dead(holder):
            continue
        client.release_concurrency_slots_with_lease(UUID(holder["lease_id"]))
        Path(holder["path"]).unlink(missing_ok=True)
        log.warning("released slot of %r held by dead process %s on %s (flow run %s)", limit, holder["pid"],
                    holder["host"], holder.get("flow_run_id") or "?")
        released.append(holder)
    return released


# -- MLflow -----------------------------------------------------------------------------------------
def tag_with_process(client, run_id: str) -> None:
    """Tag an MLflow run with this host and pid, so a later start can tell it was killed."""
    me = this_process()
    client.set_tag(run_id, HOST_TAG, me["host"])
    client.set_tag(run_id, PID_TAG, str(me["pid"]))
    if me["started"]:
        client.set_tag(run_id, STARTED_TAG, me["started"])


def kill_dead_mlflow_runs(client, experiment_id: str) -> list[str]:
    """Set ``KILLED`` every RUNNING run of the experiment whose tagged process of this host is dead."""
    runs = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                              f"tags.`{HOST_TAG}` = '{this_host()}'", max_results=1000)
    killed = []
    for run in runs:
        tags = run.data.tags
        if provably_dead({"host": tags.get(HOST_TAG), "pid": tags.get(PID_TAG), "started": tags.get(STARTED_TAG)}):
            client.set_terminated(run.info.run_id, "KILLED")
            killed.append(run.info.run_id)
    if killed:
        log.warning("marked %d MLflow run(s) of dead processes KILLED: %s", len(killed), ", ".join(killed))
    return killed


# -- Prefect flow runs ------------------------------------------------------------------------------
PROCESS_TAG_PREFIX = "wafer_fcn.process="


def claim_flow_run(client, flow_run_id: UUID | str) -> str:
    """Tag a flow run with ``wafer_fcn.process=<host>:<pid>`` of this process (the flow's own
    process: a process worker's ``infrastructure_pid`` is a bare pid, with no host)."""
    run = client.read_flow_run(UUID(str(flow_run_id)))
    tag = f"{PROCESS_TAG_PREFIX}{this_host()}:{os.getpid()}"
    if tag not in run.tags:
        client.update_flow_run(run.id, tags=[*run.tags, tag])
    return tag


def crash_dead_flow_runs(client, flow_name: str, *, exclude: set[str] = frozenset()) -> list[str]:
    """Set ``CRASHED`` every RUNNING flow run of ``flow_name`` whose tagged process here is dead."""
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    runs = client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
    crashed = []
    for run in runs:
        labels = [t.removeprefix(PROCESS_TAG_PREFIX) for t in run.tags if t.startswith(PROCESS_TAG_PREFIX)]
        if str(run.id) in exclude or not labels:
            continue
        host, _, pid = labels[-1].rpartition(":")
        if provably_dead({"host": host, "pid": pid}):
            client.set_flow_run_state(run.id, Crashed(message=f"process {labels[-1]} died"), force=True)
            crashed.append(str(run.id))
    if crashed:
        log.warning("marked %d %s flow run(s) of dead processes CRASHED: %s", len(crashed), flow_name,
                    ", ".join(crashed))
    return crashed


# -- run folders ------------------------------------------------------------------------------------
COMPLETE_MARKER = "COMPLETE.json"
# config sections that do not change what is trained: where things are stored and logged
_NOT_IN_RUN_KEY = ("name", "home", "tracking")


def curated_fingerprint(curated_root: str) -> str:
    """Hash of the curated store's part files (relative names and sizes). Ingest names every part
    after the blake2b of its rows, so the names alone pin the content; the quarantine is left out."""
    import hashlib

    from fcn_core.table import list_parquet_files, resolve_fs

    fs, files = list_parquet_files(curated_root)
    _, root = resolve_fs(curated_root)
    entries = sorted(f"{os.path.relpath(f, root)}\t{fs.get_file_info(f).size}" for f in files
                     if "/_quarantine/" not in f and os.path.basename(f).startswith("part-"))
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


def run_key(config: dict, data_fingerprint: str) -> str:
    """16 hex digits of the config (less name, home, tracking) and the data it trains on."""
    import hashlib

    kept = {k: v for k, v in config.items() if k not in _NOT_IN_RUN_KEY}
    blob = json.dumps({"config": kept, "data": data_fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class RunFolder:
    """``<runs>/<key>[-N]``, locked (``flock``) by the training using it until it ends.

    An unfinished folder of the same key (a killed training: its lock died with it) is taken
    over, so the stages resume from their ``last.pt``; a folder with ``COMPLETE.json`` is never
    reused (a deliberate re-training gets ``<key>-2``, ...), nor one a live training holds.
    """

    def __init__(self, path: Path, fd: int, resumed: bool):
        self.path, self._fd, self.resumed = path, fd, resumed

    @classmethod
    def claim(cls, runs_root: Path, key: str) -> RunFolder:
        import fcntl
        import itertools

        for n in itertools.count(1):
            path = Path(runs_root) / (key if n == 1 else f"{key}-{n}")
            if (path / COMPLETE_MARKER).exists():
                continue
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live training of the same key
                os.close(fd)
                continue
            if (path / COMPLETE_MARKER).exists():  # finished while we looked
                os.close(fd)
                continue
            return cls(path, fd, resumed=(path / "checkpoints").exists())
        raise AssertionError("unreachable")

    def complete(self, **details) -> None:
        tmp = self.path / f".{COMPLETE_MARKER}.tmp"
        tmp.write_text(json.dumps({**details, "finished": time.time()}, indent=1, default=str))
        os.replace(tmp, self.path / COMPLETE_MARKER)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1
