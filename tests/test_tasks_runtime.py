import uuid

import pytest
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from tasks.data import ingest_file
from tasks.runtime import RESULTS_DIRNAME, ensure_concurrency_limit, make_task_runner, persisted


def test_thread_runner_runs_at_most_the_given_number_of_tasks_at_once(prefect_harness):
    import threading
    import time

    from prefect import flow, task

    running, peak, lock = [0], [0], threading.Lock()

    @task
    def busy(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.5)  # long enough for the pool to start every thread it may
        with lock:
            running[0] -= 1
        return i

    @flow(task_runner=make_task_runner("threads", dask_workers=3))
    def fan_out() -> list[int]:
        return [f.result() for f in busy.map(range(9))]

    assert fan_out() == list(range(9))
    assert peak[0] == 3  # never more than 3 at once, and the limit is reached


def test_task_runner_choice():
    assert isinstance(make_task_runner("threads", dask_workers=3), ThreadPoolTaskRunner)
    local = make_task_runner("dask", dask_workers=2)
    assert isinstance(local, DaskTaskRunner)
    assert local.cluster_kwargs["n_workers"] == 2 and local.cluster_kwargs["processes"] is False
    remote = make_task_runner("dask", dask_address="tcp://10.0.0.5:8786")
    assert remote.address == "tcp://10.0.0.5:8786"
    with pytest.raises(ValueError, match="unknown task runner 'ray'"):
        make_task_runner("ray")  # type: ignore[arg-type]


def test_persisted_tasks_store_results_under_the_home(tmp_path):
    task = persisted(ingest_file, tmp_path)
    assert task.persist_result is True
    assert task.result_storage == (tmp_path / RESULTS_DIRNAME).resolve()
    assert task.cache_policy is ingest_file.cache_policy


def test_concurrency_limit_is_created_once_with_one_slot(prefect_harness):
    from prefect.client.orchestration import get_client

    name = f"gpu-test-{uuid.uuid4().hex[:8]}"
    assert ensure_concurrency_limit(name) is True
    assert ensure_concurrency_limit(name, limit=4) is False  # an existing limit is left alone
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).limit == 1


def _dead_process() -> dict:
    """The record of a process that ran on this host and is gone."""
    import subprocess
    import sys

    from tasks import recovery

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    record = {"host": recovery.this_host(), "pid": child.pid, "started": recovery.process_started(child.pid)}
    child.kill()
    child.wait()
    return record


def _take_slot(name: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.increment_concurrency_slots_with_lease(
            names=[name], slots=1, mode="concurrency", lease_duration=60).json()["lease_id"]


def _active_slots(name: str) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots


def test_a_dead_holders_slot_is_released_and_a_live_one_is_waited_for(prefect_harness):
    import json
    import os
    import signal
    import threading

    from tasks import recovery
    from tasks.runtime import SlotWaitInterrupted, gpu_slot

    name = f"gpu-test-{uuid.uuid4().hex[:8]}"
    ensure_concurrency_limit(name)
    # a killed training: its lease is on the server, its process is gone
    dead = _dead_process()
    lease = _take_slot(name)
    folder = recovery.holders_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{lease}.json").write_text(json.dumps({**dead, "lease_id": lease}))
    lines: list[str] = []
    with gpu_slot(name, info=lines.append, poll_seconds=0.1):
        assert _active_slots(name) == 1  # ours; the dead holder's was given back
        assert not (folder / f"{lease}.json").exists()
    assert _active_slots(name) == 0 and lines == []  # no wait
    assert not list(folder.glob("*.json"))

    # a live holder (this process): the wait is logged and Ctrl-C ends it, acquiring nothing
    live = _take_slot(name)
    recovery.record_holder(name, live)
    # Ctrl-C as a terminal sends it, even where this process was started with SIGINT ignored
    # (a background job of a non-interactive shell: the wait would never end)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(1.0, os.kill, args=(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(SlotWaitInterrupted, match=name):
            with gpu_slot(name, info=lines.append, poll_seconds=0.1):
                pytest.fail("the slot was taken twice")
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert len(lines) == 1 and f"waiting for a free slot of global concurrency limit {name!r}" in lines[0]
    assert f"pid {os.getpid()}" in lines[0]
    assert _active_slots(name) == 1  # still the live holder's


def test_file_lock_makes_the_second_holder_wait(tmp_path):
    import threading

    from tasks.runtime import file_lock

    lock = tmp_path / "sub" / ".lock"
    order: list[str] = []
    lines: list[str] = []
    with file_lock(lock, what="the first", info=lines.append):
        def second() -> None:
            with file_lock(lock, what="the first", info=lines.append, poll_seconds=0.05):
                order.append("second")
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(timeout=0.5)
        assert thread.is_alive() and order == []  # blocked while we hold it
        order.append("first")
    thread.join(timeout=10)
    assert order == ["first", "second"]
    assert lines[0].startswith("waiting for the first:") and lines[-1] == "got the first"
