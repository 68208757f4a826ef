"""Shared fixtures: a real MLflow tracking server on 127.0.0.1 (one process per session) and a
real PostgreSQL server (one per session, started when a test first asks for it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.mlflow_server import FAIL_FAST_CLIENT_ENV, MlflowServer
from tests.support.postgres import PostgresServer

#: Scripts that tests run in processes of their own (a backend chosen by environment, a
#: process group): not modules to import for doctests in the pytest process.
collect_ignore = ["support/keras_train.py", "support/outage_train.py", "support/ddp_worker.py"]


@pytest.fixture(scope="session")
def _mlflow_server_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    try:
        server.start()
        yield server
    finally:
        server.kill()


@pytest.fixture
def mlflow_fail_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow client calls in this test fail at once against a dead server (no retries)."""
    for name, value in FAIL_FAST_CLIENT_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def mlflow_server(_mlflow_server_process: MlflowServer, mlflow_fail_fast: None) -> MlflowServer:
    """The session's tracking server, up. Do not stop it: use `restartable_mlflow_server`."""
    _mlflow_server_process.start()  # a no-op unless an earlier test left it stopped
    return _mlflow_server_process


@pytest.fixture
def restartable_mlflow_server(
    _mlflow_server_process: MlflowServer, mlflow_fail_fast: None
) -> Iterator[MlflowServer]:
    """The session's server, which this test may `stop()` and `start()` (same url, same
    store); it is running again for the next test. Runs are the unit of isolation."""
    _mlflow_server_process.start()
    yield _mlflow_server_process
    _mlflow_server_process.start()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server; each test takes a database of its own
    (`postgres_server.new_database()`)."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()
