"""A real `mlflow server` on 127.0.0.1 for tests.

SQLite backend store and proxied artifacts (`--serve-artifacts`, so clients log artifacts
over HTTP) live in one temporary directory. `stop()` and `start()` again keep the same port
and the same database, so a test can take the tracking server away mid-training.

    server = MlflowServer(tmp_path)
    server.start()          # ~10 s on a 2-core machine: CLI import, DB migrations, uvicorn
    client = mlflow.MlflowClient(server.url)
    server.stop()           # SIGTERM to the process group, then wait
    server.start()          # same url, same data
    server.kill()           # stop for good: SIGKILL to the group (teardown)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

__all__ = ["FAIL_FAST_CLIENT_ENV", "MlflowServer"]

#: MLflow 3.x client settings (mlflow/environment_variables.py, read per request in
#: mlflow/utils/rest_utils.py) that make a call to a dead server fail at once instead of
#: retrying for minutes (defaults: 7 retries, backoff factor 2, jitter 1.0, timeout 120 s).
FAIL_FAST_CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}

#: Server-side: no huey job runner (it is not needed here and costs seconds at start).
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it; it may be taken again later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class MlflowServer:
    """One `mlflow server` process group, restartable on the same port and store."""

    def __init__(self, root: Path, *, startup_timeout: float = 60.0) -> None:
        self.root = root
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.startup_seconds: list[float] = []  # one entry per successful start
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("MlflowServer.url is known once start() has been called.")
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server and wait until GET /health answers. The first start picks a free
        port (another one if the server could not bind it); later starts reuse it."""
        if self.running:
            return
        first = self.port is None
        for _attempt in range(3):
            if first:
                self.port = free_port()
            if self._launch():
                return
        raise RuntimeError(
            f"mlflow server did not come up on port {self.port} in 3 tries:\n{self._log_tail()}"
        )

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the server's process group and wait for it (SIGKILL after `timeout`).
        Clients see "connection refused" from now on."""
        self._signal_group(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Stop for good, at once: SIGKILL to the process group (for teardown)."""
        self._signal_group(signal.SIGKILL, 15.0)

    def _signal_group(self, signum: signal.Signals, timeout: float) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        # uvicorn may outlive the CLI process that started it for a moment: take the group down.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    def _launch(self) -> bool:
        """Start one process; True once healthy, False if it exited (port taken?)."""
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--serve-artifacts",
            "--artifacts-destination", str(self.root / "artifacts"),
        ]  # fmt: skip
        started = time.monotonic()
        with open(self.root / "server.log", "ab") as log:
            self._process = subprocess.Popen(
                command,
                cwd=self.root,
                env={**os.environ, **SERVER_ENV},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so stop() reaches uvicorn
            )
        while time.monotonic() - started < self.startup_timeout:
            if self._process.poll() is not None:
                self._process = None
                return False
            if self._healthy():
                self.startup_seconds.append(time.monotonic() - started)
                return True
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(
            f"mlflow server did not answer {self.url}/health within {self.startup_timeout} s:\n"
            f"{self._log_tail()}"
        )

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1.0) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            return (self.root / "server.log").read_text(errors="replace")[-3000:]
        except OSError:
            return "(no server.log)"
