"""A temporary Prefect API server for one CLI command, that dies with the command.

Without ``PREFECT_API_URL`` Prefect 3.9 starts its own temporary server on the first client call
(``prefect.server.api.server.SubprocessASGIServer``: a plain ``subprocess.Popen`` of uvicorn,
stopped by an ``atexit`` hook). A ``kill -9`` of the CLI skips ``atexit``, so that server stayed
up, listening, forever. This one is the same uvicorn app, started by the CLI before Prefect is
used, but the child watches its parent: ``PR_SET_PDEATHSIG`` (Linux: the kernel sends SIGTERM the
moment the parent dies) and, everywhere, a thread that polls ``getppid()``.

The server also keeps concurrency leases on disk (``lease_storage.filesystem`` under the Prefect
home, beside its SQLite database), so a later command can release a killed holder's GPU slot by
its lease id (tasks.recovery); the default in-memory leases died with the old server process,
leaving the slot counted as taken for ever.

    python -m tasks.prefect_server PARENT_PID PORT
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"
PR_SET_PDEATHSIG = 1


class TemporaryServer:
    def __init__(self, process: subprocess.Popen, port: int):
        self.process, self.port = process, port

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(*, timeout: float = 120.0) -> TemporaryServer:
    """Start the server for this process and wait until ``/api/health`` answers."""
    port = _free_port()
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": os.environ.get(
               "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", LEASE_STORAGE)}
    env.pop("PREFECT_API_URL", None)
    process = subprocess.Popen([sys.executable, "-m", "tasks.prefect_server", str(os.getpid()), str(port)], env=env)
    server = TemporaryServer(process, port)
    atexit.register(server.stop)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the temporary Prefect server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{server.api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"the temporary Prefect server did not answer on port {port} within {timeout:.0f} s")


# -- the child --------------------------------------------------------------------------------------
def _die_with(parent: int) -> None:
    try:  # Linux: the kernel signals us the moment the parent dies
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before prctl took effect
        sys.exit(0)

    def watch() -> None:  # everywhere else (and if SIGTERM does not end uvicorn soon)
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def main(argv: list[str]) -> None:
    parent, port = int(argv[0]), int(argv[1])
    _die_with(parent)
    import uvicorn

    uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1", port=port,
                log_level="error", lifespan="on")


if __name__ == "__main__":
    main(sys.argv[1:])
