"""The local stack: Prefect server + process work pool + deployments + worker + MLflow UI.

``stack_up`` starts what is not running yet and returns the addresses; ``stack_down`` stops what
it started, by the PIDs saved under ``<home>/stack/`` (worker first, server last, so the worker
never loses its API mid-run). Both are idempotent. Everything listens on loopback only. The
Prefect server keeps its database in ``<home>/prefect`` (not ``~/.prefect``), so a project home
is self-contained and ``rm -rf var`` resets it.

The Prefect server is Prefect's own app (``create_app``, as ``prefect server start`` runs it) with
two restrictions a browser cannot get around: CORS allows only the UI's own origin, and a
request whose Host header is not the server's own name is refused (no DNS rebinding). Run it
alone with ``python -m flows.stack prefect-server --host H --port P``. See docs/orchestration.md
(Security) for what a team deployment must add.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from fcn_core.atomic import write_bytes_atomic
from fcn_core.config import REPO_ROOT, Config

WORK_POOL = "wafer-fcn-pool"
DEFAULT_PREFECT_PORT = 4200
STATE_FILE = "stack.json"
# name -> a word its command line must contain (a recycled PID must never be signalled)
COMPONENTS = {"worker": "worker", "mlflow": "mlflow", "server": "server"}
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
# Extra Host names (comma-separated) the Prefect server answers to, e.g. behind a proxy.
ALLOWED_HOSTS_ENV = "WAFER_FCN_STACK_ALLOWED_HOSTS"
STOP_ORDER = ("worker", "mlflow", "server")

Echo = Callable[[str], None]


class StackError(RuntimeError):
    """A stack component did not start or answer; the message names its log file."""


# -- small helpers ---------------------------------------------------------------------------------
def _stack_dir(home: Path) -> Path:
    path = Path(home).expanduser().resolve() / "stack"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _pick_port(host: str, wanted: int | None, default: int, what: str, echo: Echo) -> int:
    port = wanted if wanted is not None else default
    if _port_free(host, port):
        return port
    if wanted is not None and wanted != default:
        raise StackError(f"{what}: port {host}:{port} is already in use; pick another port")
    other = free_port(host)
    echo(f"{what}: port {port} is busy, using {other}")
    return other


def _alive(pid: int, marker: str) -> bool:
    """Is ``pid`` running and still the process we started (its command line holds ``marker``)?"""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # no /proc (macOS): trust the PID file
        return True
    return marker in cmdline and "defunct" not in cmdline


def _read_pid(stack: Path, name: str) -> int | None:
    try:
        return int((stack / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _running(stack: Path, name: str) -> int | None:
    pid = _read_pid(stack, name)
    if pid is not None and _alive(pid, COMPONENTS[name]):
        return pid
    (stack / f"{name}.pid").unlink(missing_ok=True)  # stale
    return None


def _spawn(stack: Path, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start ``argv`` in its own session (so stop can signal its whole process group), log to a file."""
    log = open(stack / f"{name}.log", "ab")  # noqa: SIM115 - the child owns the descriptor
    try:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=REPO_ROOT, start_new_session=True)
    finally:
        log.close()
    (stack / f"{name}.pid").write_text(str(proc.pid))
    return proc


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_http(url: str, *, proc: subprocess.Popen, name: str, stack: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:  # (not _alive: right after fork the command line is still ours)
            raise StackError(f"{name} exited during start-up; see {stack / f'{name}.log'}:\n"
                             f"{_log_tail(stack / f'{name}.log')}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise StackError(f"{name} did not answer {url} within {timeout:.0f} s; see {stack / f'{name}.log'}:\n"
                     f"{_log_tail(stack / f'{name}.log')}")


def _cli(argv: list[str], *, env: dict[str, str], stack: Path, name: str, timeout: float = 300) -> str:
    """Run a short CLI step, appending its output to ``<name>.log``; raise with the output on failure."""
    result = subprocess.run(argv, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    with open(stack / f"{name}.log", "a") as log:
        log.write(f"$ {' '.join(argv)}\n{result.stdout}{result.stderr}\n")
    if result.returncode != 0:
        raise StackError(f"`{' '.join(argv[2:])}` failed (exit {result.returncode}):\n"
                         f"{(result.stdout + result.stderr)[-3000:]}")
    return result.stdout


def stack_env(*, home: Path, api_url: str, mlflow_ui: str | None = None) -> dict[str, str]:
    """Environment of every stack process: the project home, the API, no telemetry (offline hosts)."""
    home = Path(home).expanduser().resolve()
    env = dict(os.environ)
    env.update({
        "WAFER_FCN_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
        "DO_NOT_TRACK": "1",
        "MLFLOW_ENABLE_TELEMETRY": "false",
    })
    if mlflow_ui:
        env["WAFER_FCN_MLFLOW_UI"] = mlflow_ui
    return env


def _prefect(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


# -- the Prefect server, restricted -------------------------------------------------------------------
def allowed_hosts(host: str, environ: dict[str, str] | None = None) -> list[str]:
    """Host header names the server answers to: its own address (all loopback names when it is
    loopback) plus ``WAFER_FCN_STACK_ALLOWED_HOSTS``."""
    names = list(LOOPBACK_NAMES) if host in LOOPBACK_NAMES else [host]
    extra = (os.environ if environ is None else environ).get(ALLOWED_HOSTS_ENV, "")
    names += [n.strip() for n in extra.split(",") if n.strip()]
    return list(dict.fromkeys(names))


def ui_origins(host: str, port: int, environ: dict[str, str] | None = None) -> list[str]:
    """The origins the UI is served from: the only ones CORS lets call the API from a browser."""
    return [f"http://{f'[{n}]' if ':' in n else n}:{port}" for n in allowed_hosts(host, environ)]


def server_env(env: dict[str, str], *, host: str, port: int) -> dict[str, str]:
    """The Prefect server's settings on top of ``stack_env``: CORS limited to the UI's origins."""
    return {**env, "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": ",".join(ui_origins(host, port, env)),
            "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port)}


def server_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "flows.stack", "prefect-server", "--host", host, "--port", str(port)]


def server_app(host: str):
    """Prefect's server app (API, UI, services) behind a Host check; CORS comes from its settings."""
    from prefect.server.api.server import create_app
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    return TrustedHostMiddleware(create_app(final=True), allowed_hosts=allowed_hosts(host), www_redirect=False)


def serve_prefect(host: str, port: int) -> None:
    """What ``prefect server start`` does in the foreground with one worker, plus the Host check."""
    import prefect.settings
    import uvicorn

    uvicorn.run(server_app(host), host=host, port=port, log_level="info",
                timeout_keep_alive=prefect.settings.PREFECT_SERVER_API_KEEPALIVE_TIMEOUT.value())


# -- up / down ---------------------------------------------------------------------------------------
def stack_up(
    *,
    home: Path,
    host: str = "127.0.0.1",
    port: int | None = None,
    mlflow_port: int = 5000,
    echo: Echo = print,
    timeout: float = 90.0,
) -> dict:
    """Start the local stack (whatever part of it is not running) and return its addresses.

    ``port``: Prefect server port (None: 4200, or a free one when 4200 is busy). The MLflow UI
    serves the same tracking store the flows use (``Config.tracking_uri`` for this home); when
    that is a remote server there is nothing to start and its address is returned instead.
    """
    home = Path(home).expanduser().resolve()
    stack = _stack_dir(home)
    started: list[str] = []
    try:
        return _up(home=home, stack=stack, host=host, port=port, mlflow_port=mlflow_port, echo=echo,
                   timeout=timeout, started=started)
    except BaseException:
        # Leave nothing half-started behind: stop what this call started (workers first).
        for name in STOP_ORDER:
            if name in started:
                _stop(stack, name, echo)
        raise


def _up(*, home: Path, stack: Path, host: str, port: int | None, mlflow_port: int, echo: Echo, timeout: float,
        started: list[str]) -> dict:
    state = _read_state(stack)

    # 1. Prefect server (reused with its recorded address when already running)
    server_pid = _running(stack, "server")
    if server_pid and state.get("prefect_api"):
        api = state["prefect_api"]
        echo(f"Prefect server already running (pid {server_pid}) at {api}")
    else:
        if server_pid:  # running but we lost its address: restart it cleanly
            _stop(stack, "server", echo)
        server_port = _pick_port(host, port, DEFAULT_PREFECT_PORT, "Prefect server", echo)
        api = f"http://{host}:{server_port}/api"
        env = server_env(stack_env(home=home, api_url=api), host=host, port=server_port)
        server = _spawn(stack, "server", server_command(host, server_port), env)
        started.append("server")
        _wait_http(f"{api}/health", proc=server, name="server", stack=stack, timeout=timeout)
        echo(f"Prefect server up (pid {server.pid}): {api.removesuffix('/api')}")
    state["prefect_api"] = api

    # 2. MLflow UI on the flows' tracking store
    tracking_uri = Config(home=str(home)).tracking_uri
    mlflow_pid = _running(stack, "mlflow")
    if tracking_uri.startswith(("http://", "https://")):
        mlflow_ui = tracking_uri
        echo(f"MLflow tracking server is remote ({tracking_uri}): no local UI started")
    elif mlflow_pid and state.get("mlflow_ui"):
        mlflow_ui = state["mlflow_ui"]
        echo(f"MLflow UI already running (pid {mlflow_pid}) at {mlflow_ui}")
    else:
        ui_port = _pick_port(host, mlflow_port, 5000, "MLflow UI", echo)
        mlflow_ui = f"http://{host}:{ui_port}"
        env = stack_env(home=home, api_url=api)
        mlflow = _spawn(stack, "mlflow", [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
                                          "--host", host, "--port", str(ui_port), "--workers", "1"], env)
        started.append("mlflow")
        _wait_http(f"{mlflow_ui}/health", proc=mlflow, name="mlflow", stack=stack, timeout=timeout)
        echo(f"MLflow UI up (pid {mlflow.pid}): {mlflow_ui}  (store {tracking_uri})")
    state["mlflow_ui"] = mlflow_ui
    _write_state(stack, state)

    # 3. Work pool and deployments (both idempotent on the server side)
    env = stack_env(home=home, api_url=api, mlflow_ui=mlflow_ui)
    try:
        _cli(_prefect("work-pool", "inspect", WORK_POOL), env=env, stack=stack, name="deploy", timeout=60)
    except StackError:
        _cli(_prefect("work-pool", "create", WORK_POOL, "--type", "process"), env=env, stack=stack, name="deploy")
        echo(f"created work pool {WORK_POOL!r} (type process)")
    _cli(_prefect("--no-prompt", "deploy", "--all"), env=env, stack=stack, name="deploy")
    echo("deployed train-fcn/train-fcn and nightly-inference/nightly-inference (prefect.yaml)")

    # 4. Worker (started last: it inherits the MLflow UI address for run links)
    worker_pid = _running(stack, "worker")
    if worker_pid and {"server", "mlflow"} & set(started):  # its API or UI address changed
        echo("restarting the worker for the new server/UI address")
        _stop(stack, "worker", echo)
        worker_pid = None
    if worker_pid:
        echo(f"worker already running (pid {worker_pid})")
    else:
        worker = _spawn(stack, "worker", _prefect("worker", "start", "--pool", WORK_POOL, "--type", "process"), env)
        started.append("worker")
        echo(f"worker polling {WORK_POOL!r} (pid {worker.pid}); log {stack / 'worker.log'}")

    state.update({"home": str(home), "tracking_uri": tracking_uri, "work_pool": WORK_POOL})
    _write_state(stack, state)
    return {
        "prefect_api": api,
        "prefect_ui": api.removesuffix("/api"),
        "mlflow_ui": mlflow_ui,
        "tracking_uri": tracking_uri,
        "work_pool": WORK_POOL,
        "pids": {name: _read_pid(stack, name) for name in COMPONENTS},
        "started": started,
        "stack_dir": str(stack),
        "env": {k: env[k] for k in ("PREFECT_API_URL", "WAFER_FCN_HOME", "WAFER_FCN_MLFLOW_UI") if k in env},
    }


def _stop(stack: Path, name: str, echo: Echo, *, grace: float = 20.0) -> bool:
    pid = _read_pid(stack, name)
    pid_file = stack / f"{name}.pid"
    if pid is None or not _alive(pid, COMPONENTS[name]):
        pid_file.unlink(missing_ok=True)
        return False
    try:
        os.killpg(pid, signal.SIGTERM)  # its own session: children (uvicorn, flow runs) go too
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid, COMPONENTS[name]):
        time.sleep(0.2)
    if _alive(pid, COMPONENTS[name]):
        echo(f"{name} (pid {pid}) ignored SIGTERM for {grace:.0f} s: killing it")
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap(pid)
    pid_file.unlink(missing_ok=True)
    echo(f"stopped {name} (pid {pid})")
    return True


def _reap(pid: int) -> None:
    """Collect the exit status when this process is the parent (tests), so no zombie lingers."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stack_down(*, home: Path, echo: Echo = print) -> None:
    """Stop the stack's processes by their saved PIDs: worker, MLflow UI, then the server."""
    stack = _stack_dir(home)
    stopped = [name for name in STOP_ORDER if _stop(stack, name, echo)]
    if not stopped:
        echo(f"nothing running (no live PIDs in {stack})")
    state = _read_state(stack)
    if state:
        state.pop("prefect_api", None)
        state.pop("mlflow_ui", None)
        _write_state(stack, state)


def _read_state(stack: Path) -> dict:
    try:
        return json.loads((stack / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_state(stack: Path, state: dict) -> None:
    write_bytes_atomic(stack / STATE_FILE, json.dumps(state, indent=1, sort_keys=True).encode())


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.stack")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("prefect-server", help="run the stack's restricted Prefect server in the foreground")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=DEFAULT_PREFECT_PORT)
    args = parser.parse_args()
    serve_prefect(args.host, args.port)
