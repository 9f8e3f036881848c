import uuid

import pytest
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from tasks.data import ingest_file
from tasks.runtime import RESULTS_DIRNAME, ensure_concurrency_limit, make_task_runner, persisted


def test_task_runner_choice():
    threads = make_task_runner("threads", dask_workers=3)
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 3
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
