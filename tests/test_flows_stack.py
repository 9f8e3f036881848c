"""Stop/start bookkeeping of the local stack, without starting the real services (the e2e test does)."""

import socket
import subprocess
import sys
import time

import pytest

from flows import stack


def spawn(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(list(argv), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_exec(proc: subprocess.Popen, marker: str) -> None:
    """Until the child has exec'd (its command line is its own, not a copy of ours)."""
    for _ in range(100):
        if stack._alive(proc.pid, marker):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {proc.pid} never showed {marker!r}")


def test_stack_down_with_nothing_running_says_so(tmp_path):
    messages = []
    stack.stack_down(home=tmp_path, echo=messages.append)
    assert messages == [f"nothing running (no live PIDs in {tmp_path.resolve() / 'stack'})"]


def test_stack_down_stops_its_processes_worker_first_and_removes_pid_files(tmp_path):
    stack_dir = stack._stack_dir(tmp_path)
    # stand-ins whose command lines carry the component markers
    procs = {name: spawn(sys.executable, "-c", "import time; time.sleep(60)", marker)
             for name, marker in stack.COMPONENTS.items()}
    for name, proc in procs.items():
        wait_exec(proc, stack.COMPONENTS[name])
        (stack_dir / f"{name}.pid").write_text(str(proc.pid))
    messages = []
    stack.stack_down(home=tmp_path, echo=messages.append)
    assert messages == [f"stopped {n} (pid {procs[n].pid})" for n in ("worker", "mlflow", "server")]
    for proc in procs.values():
        assert proc.wait(timeout=5) is not None
    assert list(stack_dir.glob("*.pid")) == []


def test_a_recycled_pid_is_never_signalled(tmp_path):
    stranger = spawn("sleep", "30")  # its command line does not say "worker"
    try:
        wait_exec(stranger, "sleep")
        (stack._stack_dir(tmp_path) / "worker.pid").write_text(str(stranger.pid))
        stack.stack_down(home=tmp_path, echo=lambda _: None)
        assert stranger.poll() is None
        assert not (tmp_path / "stack" / "worker.pid").exists()
    finally:
        stranger.kill()
        stranger.wait()


def test_busy_default_port_falls_back_and_busy_explicit_port_is_an_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        said = []
        other = stack._pick_port("127.0.0.1", None, port, "Prefect server", said.append)
        assert other != port and said == [f"Prefect server: port {port} is busy, using {other}"]
        with pytest.raises(stack.StackError, match=f"port 127.0.0.1:{port} is already in use"):
            stack._pick_port("127.0.0.1", port, 4200, "Prefect server", said.append)


def test_stack_env_points_every_process_at_the_home_and_the_api(tmp_path):
    env = stack.stack_env(home=tmp_path, api_url="http://127.0.0.1:1/api", mlflow_ui="http://127.0.0.1:2")
    assert env["WAFER_FCN_HOME"] == str(tmp_path.resolve())
    assert env["PREFECT_HOME"] == str(tmp_path.resolve() / "prefect")
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:1/api"
    assert env["WAFER_FCN_MLFLOW_UI"] == "http://127.0.0.1:2"
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
