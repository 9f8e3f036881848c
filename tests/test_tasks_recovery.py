import os
import socket
import subprocess
import sys

from mlflow import MlflowClient

from tasks import recovery


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_a_gone_process_of_this_host_is_provably_dead():
    me = recovery.this_process()
    assert not recovery.provably_dead(me)
    assert recovery.provably_dead({**me, "pid": dead_pid(), "started": None})
    assert recovery.provably_dead({**me, "started": "1"})  # this pid, but another process (recycled)
    assert not recovery.provably_dead({**me, "pid": dead_pid(), "host": "elsewhere"})  # not ours to judge
    assert not recovery.provably_dead({"host": me["host"], "pid": "?"})


def test_running_mlflow_runs_of_dead_processes_are_killed(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("x", artifact_location=str(tmp_path / "artifacts"))
    live, dead, foreign, untagged = (client.create_run(experiment).info.run_id for _ in range(4))
    recovery.tag_with_process(client, live)
    client.set_tag(dead, recovery.HOST_TAG, socket.gethostname())
    client.set_tag(dead, recovery.PID_TAG, str(dead_pid()))
    client.set_tag(foreign, recovery.HOST_TAG, "another-host")
    client.set_tag(foreign, recovery.PID_TAG, str(dead_pid()))
    assert recovery.kill_dead_mlflow_runs(client, experiment) == [dead]
    status = {r: client.get_run(r).info.status for r in (live, dead, foreign, untagged)}
    assert status == {live: "RUNNING", dead: "KILLED", foreign: "RUNNING", untagged: "RUNNING"}


def test_run_folder_resumes_unfinished_and_never_reuses_finished_or_held(tmp_path):
    config = {"name": "tiny", "home": "/a", "train": {"seed": 0}}
    key = recovery.run_key(config, "data1")
    assert key == recovery.run_key({**config, "name": "copy", "home": "/b", "tracking": {"x": 1}}, "data1")
    assert key != recovery.run_key({**config, "train": {"seed": 1}}, "data1")
    assert key != recovery.run_key(config, "data2")

    first = recovery.RunFolder.claim(tmp_path, key)
    assert first.path == tmp_path / key and not first.resumed
    held = recovery.RunFolder.claim(tmp_path, key)  # a live training holds the first
    assert held.path == tmp_path / f"{key}-2"
    held.release()
    (first.path / "checkpoints").mkdir()
    first.release()  # killed before the end
    again = recovery.RunFolder.claim(tmp_path, key)
    assert again.path == first.path and again.resumed
    again.complete(flow_run_id="f")
    again.release()
    fresh = recovery.RunFolder.claim(tmp_path, key)
    assert fresh.path == tmp_path / f"{key}-2" and not fresh.resumed  # the finished one is kept as it is
    fresh.release()


def test_curated_fingerprint_follows_the_part_files(tmp_path):
    part = tmp_path / "date=2026-01-01" / "part-abc.parquet"
    part.parent.mkdir()
    part.write_bytes(b"x")
    quarantine = tmp_path / "_quarantine" / "part-q.parquet"
    quarantine.parent.mkdir()
    quarantine.write_bytes(b"q")
    before = recovery.curated_fingerprint(str(tmp_path))
    quarantine.write_bytes(b"qq")
    assert recovery.curated_fingerprint(str(tmp_path)) == before
    (part.parent / "part-def.parquet").write_bytes(b"y")
    assert recovery.curated_fingerprint(str(tmp_path)) != before
    os.remove(part.parent / "part-def.parquet")
    assert recovery.curated_fingerprint(str(tmp_path)) == before


def test_running_flow_runs_of_dead_processes_are_crashed(prefect_harness):
    import uuid

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    name = f"recovery-test-{uuid.uuid4().hex[:8]}"

    @flow(name=name)
    def noop() -> None:
        pass

    with get_client(sync_client=True) as client:
        live, dead, foreign = (client.create_flow_run(noop, state=Running()).id for _ in range(3))
        recovery.claim_flow_run(client, live)
        client.update_flow_run(dead, tags=[f"{recovery.PROCESS_TAG_PREFIX}{socket.gethostname()}:{dead_pid()}"])
        client.update_flow_run(foreign, tags=[f"{recovery.PROCESS_TAG_PREFIX}elsewhere:{dead_pid()}"])
        assert recovery.crash_dead_flow_runs(client, name) == [str(dead)]
        states = {r: client.read_flow_run(r).state.type.value for r in (live, dead, foreign)}
    assert states == {live: "RUNNING", dead: "CRASHED", foreign: "RUNNING"}
