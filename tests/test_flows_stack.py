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


# -- the stack's Prefect server refuses foreign web pages (issue 16.4) -----------------------------------
@pytest.fixture(scope="module")
def restricted_server(tmp_path_factory):
    """The stack's Prefect server, started exactly as ``stack_up`` starts it (command and settings)."""
    import os
    import signal
    import urllib.request
    from pathlib import Path

    home = tmp_path_factory.mktemp("home")
    port = stack.free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = stack.server_env(stack.stack_env(home=home, api_url=api), host="127.0.0.1", port=port)
    env.pop(stack.ALLOWED_HOSTS_ENV, None)
    env["PYTHONPATH"] = str(Path(stack.__file__).resolve().parents[1])
    log = open(home / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(stack.server_command("127.0.0.1", port), env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "server did not answer in 180 s"
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


def request(port: int, method: str, path: str, headers: dict[str, str], body: str | None = None):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_cors_answers_only_the_ui_origin(restricted_server):
    port = restricted_server
    own = f"http://127.0.0.1:{port}"
    status, headers, _ = request(port, "GET", "/api/health", {"Origin": "http://evil.example"})
    assert status == 200 and "access-control-allow-origin" not in headers
    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    status, headers, _ = request(port, "OPTIONS", "/api/deployments/filter", preflight)
    assert status == 400 and headers.get("access-control-allow-origin") not in ("*", "http://evil.example")
    for origin in (own, f"http://localhost:{port}"):  # the UI, as the engineer may have typed it
        status, headers, _ = request(port, "OPTIONS", "/api/deployments/filter", {**preflight, "Origin": origin})
        assert status == 200 and headers["access-control-allow-origin"] == origin


def test_a_foreign_host_header_is_refused(restricted_server):
    port = restricted_server
    for method, path, body in [("GET", "/api/health", None), ("POST", "/api/deployments/filter", "{}")]:
        status, _, _ = request(port, method, path, {"Host": f"evil.example:{port}", "Content-Type": "application/json"},
                               body)
        assert status == 400
    status, _, _ = request(port, "POST", "/api/deployments/filter",
                           {"Host": f"localhost:{port}", "Content-Type": "application/json"}, "{}")
    assert status == 200
    status, headers, _ = request(port, "GET", "/", {"Host": f"127.0.0.1:{port}"})  # the UI is still served
    assert status == 200 and headers["content-type"].startswith("text/html")


def test_allowed_hosts_and_origins_follow_the_bind_address():
    assert stack.allowed_hosts("127.0.0.1", {}) == ["127.0.0.1", "localhost", "::1"]
    assert stack.allowed_hosts("10.0.0.5", {stack.ALLOWED_HOSTS_ENV: "prefect.lab, 10.0.0.5"}) == [
        "10.0.0.5", "prefect.lab"]
    assert stack.ui_origins("127.0.0.1", 4200, {}) == [
        "http://127.0.0.1:4200", "http://localhost:4200", "http://[::1]:4200"]
