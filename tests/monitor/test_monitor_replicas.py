"""Monitors as replicas on one PostgreSQL state: real `gradwatch monitor` processes, a real
PostgreSQL server, a real MLflow server and real HTTP receivers.

One replica holds the lease and polls and sends; the others wait as standbys and take over
when it is killed (SIGKILL: no clean release), cut off from the state (a TCP proxy to
PostgreSQL, cut) or stopped (SIGTERM: released at once). Notifications go out exactly once,
including the one a killed replica had claimed but not sent."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from gradwatch.monitor.lease import Lease
from gradwatch.monitor.state import MonitorState
from tests.support.mlflow_runs import log_check, new_experiment, new_run
from tests.support.mlflow_server import MlflowServer
from tests.support.postgres import PostgresServer
from tests.support.receivers import WebhookReceiver

HOOK_ENV = "GRADWATCH_TEST_HOOK"
POLL = 1.0  # seconds: the lease lives 1.25 s, renewed every 0.25 s


class BlackHole:
    """A TCP server that accepts connections and never answers: a webhook that hangs, so the
    replica sending to it is caught between "claimed" and "sent"."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.connected = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.getsockname()[1]}/hook"

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.held.append(connection)
            self.connected.set()

    def close(self) -> None:
        self.server.close()
        for connection in self.held:
            connection.close()


class Replicas:
    def __init__(self, mlflow: MlflowServer, state_url: str, tmp_path: Path) -> None:
        self.client = MlflowClient(mlflow.url)
        self.experiment, self.experiment_id = new_experiment(self.client, tmp_path.name)
        self.state_url = state_url
        self.config = tmp_path / "monitor.toml"
        self.config.write_text(
            f'tracking_uri = "{mlflow.url}"\nexperiments = ["{self.experiment}"]\n'
            f'state_url = "{state_url}"\npoll_interval = {POLL}\nsend_interval = 0.5\n'
            "[staleness]\nenabled = false\n"
            f'[channels.hook]\nurl_env = "{HOOK_ENV}"\n'
            "[prometheus]\nenabled = false\n")
        self.processes: list[subprocess.Popen[str]] = []
        self.state = MonitorState(state_url, lock=False)

    def start(self, hook_url: str, state_url: str | None = None) -> subprocess.Popen[str]:
        env = {**os.environ, HOOK_ENV: hook_url}
        if state_url is not None:  # this replica reaches the same state another way
            env["GRADWATCH_STATE_URL"] = state_url
        process = subprocess.Popen(
            [sys.executable, "-m", "gradwatch", "monitor", "--config", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.processes.append(process)
        return process

    def holder(self) -> Lease | None:
        held = self.state.lease()
        return held if held is not None and held.expires_at > time.time() else None

    def wait_for(self, condition: object, timeout: float = 60.0) -> float:
        """Seconds until `condition()` is true (fails the test after `timeout`)."""
        started = time.monotonic()
        while not condition():  # type: ignore[operator]
            assert time.monotonic() - started < timeout, "timed out"
            time.sleep(0.05)
        return time.monotonic() - started

    def pid_of(self, held: Lease | None) -> int | None:
        return None if held is None else int(held.holder.rsplit("-", 2)[1])

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.communicate()
        self.state.close()


@pytest.fixture
def replicas(mlflow_server: MlflowServer, postgres_server: PostgresServer,
             tmp_path: Path) -> Iterator[Replicas]:
    made = Replicas(mlflow_server, postgres_server.new_database(), tmp_path)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as server:
        yield server


def test_one_replica_is_active_the_standby_takes_over_a_kill_and_alerts_go_once(
    replicas: Replicas, receiver: WebhookReceiver
) -> None:
    first = replicas.start(receiver.url())
    replicas.wait_for(lambda: replicas.pid_of(replicas.holder()) == first.pid)
    second = replicas.start(receiver.url())
    replicas.wait_for(lambda: {r.pid: r.role for r in replicas.state.replicas()} == {
        first.pid: "active", second.pid: "standby"})
    status = subprocess.run(
        [sys.executable, "-m", "gradwatch", "monitor", "status", "--json", "--state",
         replicas.state_url], capture_output=True, text=True, timeout=120)
    data = json.loads(status.stdout)
    assert replicas.pid_of(replicas.holder()) == first.pid
    assert data["lease"]["holder"].split("-")[-2] == str(first.pid)
    assert sorted(r["role"] for r in data["replicas"]) == ["active", "standby"]

    run_id = new_run(replicas.client, replicas.experiment_id)
    log_check(replicas.client, run_id, 10, 5e-3, "alert")  # a planted bug's check
    assert receiver.wait_for(1, timeout=60)
    time.sleep(4 * POLL)  # more polls by the active one, looks by the standby: nothing more
    assert len(receiver.requests) == 1

    first.send_signal(signal.SIGKILL)  # no release: the lease must lapse
    killed = time.monotonic()
    first.wait(10)
    replicas.wait_for(lambda: replicas.pid_of(replicas.holder()) == second.pid)
    assert time.monotonic() - killed <= 2 * POLL  # within two poll intervals
    log_check(replicas.client, run_id, 20, 1e-8, "ok")  # resolved
    assert receiver.wait_for(2, timeout=60)
    time.sleep(4 * POLL)
    kinds = [r.json()["kind"] for r in receiver.requests]
    assert kinds == ["firing", "resolved"], kinds


def test_a_replica_killed_between_claimed_and_sent_is_covered_by_the_next_once(
    replicas: Replicas, receiver: WebhookReceiver
) -> None:
    hole = BlackHole()
    try:
        first = replicas.start(hole.url)  # its webhook hangs: it claims, and never sends
        replicas.wait_for(lambda: replicas.pid_of(replicas.holder()) == first.pid)
        second = replicas.start(receiver.url())
        replicas.wait_for(lambda: len(replicas.state.replicas()) == 2)
        run_id = new_run(replicas.client, replicas.experiment_id)
        log_check(replicas.client, run_id, 10, 5e-3, "alert")
        assert hole.connected.wait(60), "the active replica never tried to send"
        [row] = replicas.state.outbox()
        assert row.status == "pending"  # claimed, in flight, not sent
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert receiver.wait_for(1, timeout=60)  # the standby took over and sent it
        time.sleep(4 * POLL)
        assert len(receiver.requests) == 1
        assert receiver.requests[0].json()["id"] == json.loads(row.payload)["id"]
        [sent] = replicas.state.outbox()
        assert sent.status == "sent" and replicas.pid_of(replicas.holder()) == second.pid
    finally:
        hole.close()


class Proxy:
    """A TCP forwarder to PostgreSQL that the test can cut (every connection closed, new ones
    refused) and restore: a network cut between one replica and the state."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.open: list[socket.socket] = []
        self.cut_off = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.cut_off:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.close()

    def cut(self) -> None:
        self.cut_off = True
        for connection in self.open:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self.open.clear()

    def close(self) -> None:
        self.cut()
        self.server.close()


def test_a_replica_cut_off_from_the_state_is_replaced_and_sends_nothing(
    replicas: Replicas, receiver: WebhookReceiver
) -> None:
    """The active replica reaches PostgreSQL through a proxy that is then cut: it cannot renew,
    the standby takes over within two poll intervals and sends the alert once; the cut-off
    replica, reconnected, stays a standby."""
    port = int(replicas.state_url.rsplit(":", 1)[1].split("/")[0])
    proxy = Proxy(port)
    try:
        cut_url = replicas.state_url.replace(f":{port}/", f":{proxy.port}/")
        first = replicas.start(receiver.url(), state_url=cut_url)
        replicas.wait_for(lambda: replicas.pid_of(replicas.holder()) == first.pid)
        second = replicas.start(receiver.url())
        replicas.wait_for(lambda: len(replicas.state.replicas()) == 2)
        proxy.cut()
        cut = time.monotonic()
        replicas.wait_for(lambda: replicas.pid_of(replicas.holder()) == second.pid)
        assert time.monotonic() - cut <= 2 * POLL
        run_id = new_run(replicas.client, replicas.experiment_id)
        log_check(replicas.client, run_id, 10, 5e-3, "alert")
        assert receiver.wait_for(1, timeout=60)
        proxy.cut_off = False  # the network comes back
        time.sleep(4 * POLL)
        assert len(receiver.requests) == 1
        assert replicas.pid_of(replicas.holder()) == second.pid
        assert {r.pid: r.role for r in replicas.state.replicas()} == {
            first.pid: "standby", second.pid: "active"}
    finally:
        proxy.close()


def test_a_stopped_replica_hands_over_at_once(
    replicas: Replicas, receiver: WebhookReceiver
) -> None:
    first = replicas.start(receiver.url())
    replicas.wait_for(lambda: replicas.pid_of(replicas.holder()) == first.pid)
    second = replicas.start(receiver.url())
    replicas.wait_for(lambda: len(replicas.state.replicas()) == 2)
    first.send_signal(signal.SIGTERM)  # a clean stop releases the lease
    assert first.wait(30) == 0
    replicas.wait_for(lambda: replicas.pid_of(replicas.holder()) == second.pid, timeout=POLL)
    assert [r.pid for r in replicas.state.replicas()] == [second.pid]
