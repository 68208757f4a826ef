"""`gradwatch monitor` as a real process: --once from a TOML config, a monitor killed between
"written" and "sent", the long-running service with /metrics and SIGTERM, the lock, status and
silences from the command line, and config errors before anything starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.support.mlflow_runs import log_check, new_experiment, new_run
from tests.support.mlflow_server import MlflowServer, free_port
from tests.support.postgres import PostgresServer
from tests.support.receivers import WebhookReceiver

HOOK_ENV = "GRADWATCH_TEST_HOOK"
SECRET = "tok-Zx81secret"


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as server:
        yield server


class Setup:
    def __init__(self, server: MlflowServer, receiver: WebhookReceiver, tmp_path: Path) -> None:
        self.client = MlflowClient(server.url)
        self.receiver = receiver
        self.experiment, self.experiment_id = new_experiment(self.client)
        self.state = tmp_path / "state.db"
        self.config = tmp_path / "monitor.toml"
        self.metrics_port = free_port()
        self.config.write_text(
            f'tracking_uri = "{server.url}"\n'
            f'experiments = ["{self.experiment}"]\n'
            f'state_url = "sqlite:///{self.state}"\n'
            "poll_interval = 1\nsend_interval = 0.5\n"
            "[staleness]\nenabled = false\n"
            f'[channels.hook]\nurl_env = "{HOOK_ENV}"\n'
            f"[prometheus]\nenabled = true\nport = {self.metrics_port}\n"
        )
        # the receiver ignores the query; the token stands for a secret in the URL
        self.env = {**os.environ, HOOK_ENV: receiver.url(f"/hook?token={SECRET}")}

    def run_with_env(self, changes: dict[str, str], *args: str,
                     timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`run` with some environment variables changed ("" removes one)."""
        env = {k: v for k, v in {**self.env, **changes}.items() if v != ""}
        return subprocess.run([sys.executable, "-m", "gradwatch", "monitor", *args],
                              capture_output=True, text=True, env=env, timeout=timeout)

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run_with_env({}, *args, timeout=timeout)

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "gradwatch", "monitor", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env)


@pytest.fixture
def setup(mlflow_server: MlflowServer, receiver: WebhookReceiver, tmp_path: Path) -> Setup:
    return Setup(mlflow_server, receiver, tmp_path)


def test_once_from_a_toml_config_notifies_and_prints_a_summary(setup: Setup) -> None:
    run_id = new_run(setup.client, setup.experiment_id, name="cli-run")
    log_check(setup.client, run_id, 10, 5e-3, "alert", layers={"fc.weight": 5e-3})
    done = setup.run("--once", "--config", str(setup.config))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["poll"]["transitions"] == 1 and summary["sent"] == 1
    assert setup.receiver.wait_for(1)
    assert setup.receiver.requests[0].json()["run_id"] == run_id
    assert SECRET not in done.stdout + done.stderr

    status = setup.run("status", "--json", "--config", str(setup.config))
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert [(a["run_id"], a["rule"], a["state"]) for a in data["alerts"]] == [
        (run_id, "distance", "firing")]
    assert data["outbox"] == {"pending": 0, "sent": 1, "dead": 0}
    assert data["run_names"][run_id] == "cli-run"
    table = setup.run("status", "--state", f"sqlite:///{setup.state}")
    assert table.returncode == 0, table.stderr
    assert "cli-run" in table.stdout and "firing" in table.stdout
    assert SECRET not in table.stdout


def test_a_monitor_killed_between_written_and_sent_resends_with_the_same_id(
    setup: Setup,
) -> None:
    run_id = new_run(setup.client, setup.experiment_id)
    log_check(setup.client, run_id, 10, 5e-3, "alert")
    gate = setup.receiver.hold()  # the request arrives, the answer never leaves
    process = setup.start("--once", "--config", str(setup.config))
    try:
        assert setup.receiver.wait_for(1, timeout=60), process.stderr
        process.kill()  # SIGKILL: no cleanup, the row is "written", not "sent"
        process.wait(10)
    finally:
        gate.set()
        process.kill()
        process.communicate()
    setup.receiver.gate = None
    again = setup.run("--once", "--config", str(setup.config))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["sent"] == 1
    assert setup.receiver.wait_for(2)
    first, second = (r.json() for r in setup.receiver.requests[:2])
    assert first == second  # the same notification, the same id: the receiver drops it
    third = setup.run("--once", "--config", str(setup.config))
    assert json.loads(third.stdout)["sent"] == 0 and len(setup.receiver.requests) == 2


def test_the_service_polls_serves_metrics_refuses_a_twin_and_stops_on_sigterm(
    setup: Setup,
) -> None:
    run_id = new_run(setup.client, setup.experiment_id, name="served")
    process = setup.start("--config", str(setup.config))
    try:
        log_check(setup.client, run_id, 10, 5e-3, "alert")
        assert setup.receiver.wait_for(1, timeout=60), "no notification from the service"
        assert setup.receiver.requests[0].json()["details"]["rule"] == "distance"
        url = f"http://127.0.0.1:{setup.metrics_port}/metrics"
        text = ""
        deadline = time.monotonic() + 30
        while "gradwatch_alert_firing" not in text and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    text = response.read().decode()
            except OSError:
                time.sleep(0.2)
        assert f'rule="distance",run_id="{run_id}",run_name="served"}} 1.0' in text.replace(
            f'experiment_id="{setup.experiment_id}",', "")
        twin = setup.run("--config", str(setup.config), timeout=60)
        assert twin.returncode == 2 and "monitor" in twin.stderr.lower()
        assert "lock" in twin.stderr.lower() or "another" in twin.stderr.lower()
        log_check(setup.client, run_id, 20, 1e-8, "ok")
        assert setup.receiver.wait_for(2, timeout=60)
        assert setup.receiver.requests[1].json()["kind"] == "resolved"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 0, stderr
        assert "gradwatch monitor stopped" in stderr and SECRET not in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_silences_from_the_command_line(setup: Setup) -> None:
    state = ["--state", str(setup.state)]
    added = setup.run("silence", "add", *state, "--experiment", setup.experiment,
                      "--rule", "distance", "--for", "2h", "--comment", "known issue")
    assert added.returncode == 0, added.stderr
    silence = json.loads(added.stdout)
    assert silence["rule"] == "distance" and silence["comment"] == "known issue"
    run_id = new_run(setup.client, setup.experiment_id)
    log_check(setup.client, run_id, 10, 5e-3, "alert")
    once = setup.run("--once", "--config", str(setup.config))
    assert json.loads(once.stdout)["poll"]["silenced"] == 1 and not setup.receiver.requests
    listed = setup.run("silence", "list", *state)
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [silence["id"]]
    expired = setup.run("silence", "expire", *state, str(silence["id"]))
    assert expired.returncode == 0, expired.stderr
    assert setup.run("silence", "list", *state).stdout == ""
    assert len(setup.run("silence", "list", "--all", *state).stdout.splitlines()) == 1
    missing = setup.run("silence", "expire", *state, "999")
    assert missing.returncode == 2 and "No silence with id 999" in missing.stderr
    bad_rule = setup.run("silence", "add", *state, "--rule", "distanse", "--for", "1h")
    assert bad_rule.returncode == 2 and "distance, non_finite, error" in bad_rule.stderr
    bad_for = setup.run("silence", "add", *state, "--for", "1000")
    assert bad_for.returncode == 2 and "--for must be a duration" in bad_for.stderr


def test_check_prints_the_config_without_secrets_and_bad_config_fails_first(
    setup: Setup, tmp_path: Path
) -> None:
    checked = setup.run("--check", "--config", str(setup.config))
    assert checked.returncode == 0, checked.stderr
    described = json.loads(checked.stdout)
    assert described["channels"] == {"hook": f"env:{HOOK_ENV}"}
    assert SECRET not in checked.stdout
    unset = setup.run_with_env({HOOK_ENV: ""}, "--check", "--config", str(setup.config))
    assert unset.returncode == 2 and HOOK_ENV in unset.stderr, unset.stderr
    assert unset.stdout == ""  # nothing printed as if valid
    bad = tmp_path / "bad.toml"
    bad.write_text('experiments = []\npoll_interval = -1\n[channels.x]\n'
                   f'url = "https://hooks.example.com/{SECRET}"\n')
    failed = setup.run("--once", "--config", str(bad))
    assert failed.returncode == 2
    problems = [line for line in failed.stderr.splitlines() if line.strip().startswith("- ")]
    assert len(problems) == 3, failed.stderr  # experiments, poll_interval, the clear URL
    assert SECRET not in failed.stderr
    assert not (tmp_path / "state.db").exists() or (tmp_path / "state.db") == setup.state
    nowhere = tmp_path / "elsewhere" / "none.db"
    missing = setup.run("status", "--state", str(nowhere))
    assert missing.returncode == 2 and "No monitor state at" in missing.stderr
    assert not nowhere.parent.exists()  # status creates nothing


def test_check_lists_channel_problems_with_the_files_problems(tmp_path: Path) -> None:
    """An unset channel variable and a value that is no URL come in the same listing as the
    file's own problems, nothing printed as valid (MLflow is not needed to check a config)."""
    config = tmp_path / "monitor.toml"
    config.write_text(
        'experiments = ["x"]\n'
        "poll_intervall = 30\n"
        "[thresholds]\nwarn = 1e-2\nalert = 1e-3\n"
        f'[channels.hook]\nurl_env = "{HOOK_ENV}"\n'
        '[channels.pager]\nurl_env = "GRADWATCH_TEST_PAGER"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
    env["GRADWATCH_TEST_PAGER"] = SECRET  # a token without its URL
    checked = subprocess.run(
        [sys.executable, "-m", "gradwatch", "monitor", "--check", "--config", str(config)],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert checked.stdout == ""  # nothing printed as if valid
    assert f"Invalid gradwatch monitor config (in {config}), 4 problems:" in checked.stderr
    problems = [line.strip() for line in checked.stderr.splitlines()
                if line.strip().startswith("- ")]
    where = {line.split(":")[0].removeprefix("- "): line for line in problems}
    assert set(where) == {"poll_intervall", "thresholds", "channels.hook", "channels.pager"}
    assert f"environment variable {HOOK_ENV} is not set" in where["channels.hook"]
    assert "does not hold a URL with a scheme" in where["channels.pager"]
    assert SECRET not in checked.stderr and "Traceback" not in checked.stderr


def test_a_job_still_running_at_its_next_run_time_is_counted_not_a_traceback(
    setup: Setup,
) -> None:
    """A slow webhook holds the send job past its 0.5 s interval: APScheduler reports the next
    run as a max-instances event (a JobSubmissionEvent, with `scheduled_run_times`), which the
    listener counts as a miss instead of failing on the attribute a missed run's event has."""
    run_id = new_run(setup.client, setup.experiment_id)
    log_check(setup.client, run_id, 10, 5e-3, "alert")
    gate = setup.receiver.hold()
    process = setup.start("--config", str(setup.config))
    try:
        assert setup.receiver.wait_for(1, timeout=60), "no notification from the service"
        time.sleep(3)  # the held send job overruns its interval several times
        gate.set()
        status = json.loads(setup.run("status", "--json", "--config", str(setup.config)).stdout)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        gate.set()
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert "is still running from the previous time (scheduled 20" in stderr, stderr
    assert "AttributeError" not in stderr and "Traceback" not in stderr, stderr
    assert status["scheduler"]["misses"] >= 1, status


def test_once_and_status_on_a_postgresql_state(
    setup: Setup, postgres_server: PostgresServer
) -> None:
    """The same service reading and writing its state on a real PostgreSQL server."""
    url = postgres_server.new_database()
    config = setup.config.read_text().replace(f'state_url = "sqlite:///{setup.state}"',
                                              f'state_url = "{url}"')
    assert url in config
    setup.config.write_text(config)
    run_id = new_run(setup.client, setup.experiment_id, name="pg-run")
    log_check(setup.client, run_id, 10, 5e-3, "alert")
    done = setup.run("--once", "--config", str(setup.config))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["sent"] == 1 and setup.receiver.wait_for(1)
    again = setup.run("--once", "--config", str(setup.config))  # the state remembered it
    assert json.loads(again.stdout)["sent"] == 0 and len(setup.receiver.requests) == 1
    status = json.loads(setup.run("status", "--json", "--state", url).stdout)
    assert [(a["run_id"], a["state"]) for a in status["alerts"]] == [(run_id, "firing")]
    assert status["outbox"] == {"pending": 0, "sent": 1, "dead": 0}
