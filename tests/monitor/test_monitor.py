"""The monitor end to end, in process: a real `mlflow server`, a real HTTP receiver, the real
state database, and a manual clock. Firing, resolved, repeat, silence, stale, a receiver that is
down then up, a restart, and the /metrics exposition."""

from __future__ import annotations

import json
import math
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from gradwatch import MonitorLockedError
from gradwatch.alerts.state import transition_id
from gradwatch.monitor.config import MonitorConfig
from gradwatch.monitor.metrics import MetricsServer
from gradwatch.monitor.service import Monitor
from gradwatch.monitor.state import MonitorState
from gradwatch.monitor.stored import SilenceMatcher
from tests.support.mlflow_runs import T0_MS, log_check, new_experiment, new_run
from tests.support.mlflow_server import MlflowServer
from tests.support.receivers import WebhookReceiver

T0 = T0_MS / 1000.0  # check at step s was logged at T0 + s seconds (tests.support.mlflow_runs)
HOOK_ENV = "GRADWATCH_TEST_HOOK"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as server:
        yield server


@pytest.fixture
def client(mlflow_server: MlflowServer) -> MlflowClient:
    return MlflowClient(mlflow_server.url)


class Rig:
    """An experiment on the shared server and a way to build monitors on one state file."""

    def __init__(self, server: MlflowServer, client: MlflowClient, receiver: WebhookReceiver,
                 tmp_path: Path) -> None:
        self.client = client
        self.receiver = receiver
        self.experiment, self.experiment_id = new_experiment(client)
        self.state_url = f"sqlite:///{tmp_path / 'state.db'}"
        self.server_url = server.url
        self.clock = Clock(T0 + 1000)

    def config(self, **overrides: Any) -> MonitorConfig:
        settings: dict[str, Any] = {
            "tracking_uri": self.server_url, "experiments": [self.experiment],
            "state_url": self.state_url, "channels": {"hook": {"url_env": HOOK_ENV}},
            # checks are logged at T0 + step seconds while the clock reads T0 + 1000: only the
            # staleness test wants the stale rule
            "staleness": {"enabled": False},
        }
        settings.update(overrides)
        return MonitorConfig.model_validate(settings)

    def monitor(self, **overrides: Any) -> Monitor:
        return Monitor(self.config(**overrides), clock=self.clock,
                       environ={HOOK_ENV: self.receiver.url("/hook")})

    def bodies(self) -> list[dict[str, Any]]:
        return [request.json() for request in self.receiver.requests]


@pytest.fixture
def rig(mlflow_server: MlflowServer, client: MlflowClient, receiver: WebhookReceiver,
        tmp_path: Path) -> Rig:
    return Rig(mlflow_server, client, receiver, tmp_path)


LAYERS_BAD = {"encoder.weight": 3e-2, "encoder.bias": 2e-8, "head.weight": 5e-3}
LAYERS_OK = {"encoder.weight": 1e-8, "encoder.bias": 2e-8, "head.weight": 1e-8}


def log_precision(client: MlflowClient, run_id: str, step: int, verdict: str,
                  ratio: float | None, layers: dict[str, float] | None = None) -> None:
    """The training-kernels metrics of the check at `step`, in the record's layout (after
    `log_check`, at the same step and time)."""
    from mlflow.entities import Metric

    from gradwatch.record.layout import (
        PRECISION_LAYER_PREFIX,
        PRECISION_RATIO,
        PRECISION_VERDICT,
        VERDICT_CODES,
        encode_metric,
    )

    timestamp = T0_MS + step * 1000
    metrics = [Metric(PRECISION_VERDICT, float(VERDICT_CODES[verdict]), timestamp, step)]
    if ratio is not None:
        metrics.append(Metric(PRECISION_RATIO, encode_metric(ratio), timestamp, step))
    metrics += [Metric(PRECISION_LAYER_PREFIX + name, encode_metric(value), timestamp, step)
                for name, value in (layers or {}).items()]
    client.log_batch(run_id, metrics=metrics)


def test_fired_and_resolved_between_polls_both_notify_once(rig: Rig) -> None:
    run_id = new_run(rig.client, rig.experiment_id, name="bert-tiny")
    monitor = rig.monitor()
    try:
        log_check(rig.client, run_id, 10, 1e-8, "ok", layers=LAYERS_OK)
        log_check(rig.client, run_id, 20, 2e-2, "alert", layers=LAYERS_BAD)
        log_check(rig.client, run_id, 30, 1e-8, "ok", layers=LAYERS_OK)
        summary, sent = monitor.run_once()
        assert (summary.runs, summary.new_checks, summary.transitions, summary.queued) == (
            1, 3, 2, 2)
        assert sent.sent == 2 and rig.receiver.wait_for(2)
        firing, resolved = rig.bodies()
        key = f"{run_id}/distance"
        assert firing["id"] == transition_id(key, "firing", 20)
        assert resolved["id"] == transition_id(key, "resolved", 30)
        assert rig.receiver.requests[0].header("Idempotency-Key") == firing["id"]
        assert firing["kind"] == "firing" and firing["step"] == 20
        assert "bert-tiny" in firing["title"] and "3.00e-02" in firing["title"]
        # one message per run: the worst layers are listed in it, worst first
        layers = [entry["layer"] for entry in firing["details"]["worst_layers"]]
        assert layers[:2] == ["encoder.weight", "head.weight"]
        assert "encoder.weight 3.00e-02" in firing["body"]
        assert firing["details"]["run_url"] == (
            f"{rig.server_url}/#/experiments/{rig.experiment_id}/runs/{run_id}")
        assert resolved["kind"] == "resolved" and resolved["details"]["fired_at_step"] == 20

        again, sent_again = monitor.run_once()  # nothing new: nothing read, nothing sent
        assert (again.new_checks, again.transitions, sent_again.sent) == (0, 0, 0)
        assert len(rig.receiver.requests) == 2
    finally:
        monitor.close()


def test_repeat_while_firing_and_resolve_after_policy(rig: Rig) -> None:
    run_id = new_run(rig.client, rig.experiment_id)
    monitor = rig.monitor(policies={"distance": {"repeat_every": 2, "resolve_after": 2}})
    try:
        for step in (10, 20, 30, 40):
            log_check(rig.client, run_id, step, 5e-3, "alert")
        log_check(rig.client, run_id, 50, 1e-8, "ok")  # one clean check: not yet resolved
        monitor.run_once()
        assert [(b["kind"], b["step"]) for b in rig.bodies()] == [("firing", 10), ("repeat", 30)]
        assert rig.bodies()[1]["title"].startswith("gradwatch STILL FIRING")
        log_check(rig.client, run_id, 60, 1e-8, "ok")
        monitor.run_once()
        assert [(b["kind"], b["step"]) for b in rig.bodies()][2:] == [("resolved", 60)]
        stored = monitor.state.alert(run_id, "distance")
        assert stored is not None and stored.state.state == "inactive"
        assert stored.last_transition == "resolved"
    finally:
        monitor.close()


def test_non_finite_and_error_checks_have_their_own_rules(rig: Rig) -> None:
    run_id = new_run(rig.client, rig.experiment_id)
    monitor = rig.monitor()
    try:
        log_check(rig.client, run_id, 10, 1e-8, "alert",
                  layers={"w": math.nan, "b": 1e-9})
        log_check(rig.client, run_id, 20, math.nan, "error")
        monitor.run_once()
        kinds = [(b["details"]["rule"], b["kind"], b["step"]) for b in rig.bodies()]
        # the NaN layer fires non_finite (not distance); the error check resolves it (an
        # error check says nothing about the values) and fires error
        assert kinds == [("non_finite", "firing", 10), ("non_finite", "resolved", 20),
                         ("error", "firing", 20)]
        assert rig.bodies()[0]["details"]["worst_layers"][0] == {"layer": "w",
                                                                 "rel_distance": "nan"}
    finally:
        monitor.close()


def test_a_silence_mutes_then_its_expiry_lets_notifications_through(rig: Rig) -> None:
    run_id = new_run(rig.client, rig.experiment_id)
    other = new_run(rig.client, rig.experiment_id)
    monitor = rig.monitor()
    try:
        silence = monitor.state.add_silence(
            SilenceMatcher(experiment=rig.experiment, rule="distance"), duration=3600,
            comment="known bad init")
        log_check(rig.client, run_id, 10, 5e-3, "alert")
        log_check(rig.client, other, 10, math.nan, "error")  # another rule: not muted
        summary, _ = monitor.run_once()
        assert summary.silenced == 1 and summary.queued == 1
        assert [(b["run_id"], b["details"]["rule"]) for b in rig.bodies()] == [(other, "error")]
        stored = monitor.state.alert(run_id, "distance")
        assert stored is not None and stored.state.state == "firing"  # tracked while muted
        monitor.state.expire_silence(silence)
        log_check(rig.client, run_id, 20, 1e-8, "ok")
        monitor.run_once()
        assert [(b["run_id"], b["kind"]) for b in rig.bodies()][1:] == [(run_id, "resolved")]
    finally:
        monitor.close()


def test_a_running_run_that_stops_checking_goes_stale_and_resolves(rig: Rig) -> None:
    run_id = new_run(rig.client, rig.experiment_id, every="10")  # steps: interval observed
    monitor = rig.monitor(staleness={"enabled": True, "multiple": 3})
    try:
        for step in (10, 20, 30):  # checks 10 s apart
            log_check(rig.client, run_id, step, 1e-8, "ok")
        rig.clock.now = T0 + 30 + 29  # 29 s since the last check: < 3 × 10 s
        monitor.run_once()
        assert rig.bodies() == []
        rig.clock.now = T0 + 30 + 31
        monitor.run_once()
        (stale,) = rig.bodies()
        assert stale["details"]["rule"] == "stale" and stale["kind"] == "firing"
        assert stale["step"] == 30 and stale["details"]["expected_interval_seconds"] == 10
        assert stale["severity"] == "warning" and "has not checked" in stale["title"]
        monitor.run_once()  # still stale, no repeat configured: no new message
        assert len(rig.bodies()) == 1
        log_check(rig.client, run_id, 40, 1e-8, "ok")  # checks resume
        rig.clock.now = T0 + 45
        monitor.run_once()
        assert rig.bodies()[1]["kind"] == "resolved"
        assert "checks resumed" in rig.bodies()[1]["title"]
        rig.clock.now = T0 + 40 + 31  # stale again; then the run ends
        monitor.run_once()
        rig.client.set_terminated(run_id, "FINISHED")
        monitor.run_once()
        assert [b["kind"] for b in rig.bodies()][2:] == ["firing", "resolved"]
        assert "run FINISHED" in rig.bodies()[3]["title"]
        assert rig.bodies()[2]["id"] != stale["id"]  # a new episode, a new id
    finally:
        monitor.close()


def test_a_receiver_that_is_down_then_up_gets_the_notification_once(rig: Rig) -> None:
    run_id = new_run(rig.client, rig.experiment_id)
    monitor = rig.monitor()
    try:
        port = rig.receiver.port
        rig.receiver.stop()
        log_check(rig.client, run_id, 10, 5e-3, "alert")
        _, sent = monitor.run_once()
        assert (sent.sent, sent.failed) == (0, 1)
        (row,) = monitor.state.outbox("pending")
        assert row.attempts == 1 and "could not reach" in (row.last_error or "")
        assert row.next_attempt_at == rig.clock.now + monitor.state.backoff_delay(1)
        assert monitor.send_due().failed == 0  # not due yet: no attempt
        rig.receiver.start(port)
        rig.clock.now = row.next_attempt_at
        assert monitor.send_due().sent == 1
        assert rig.receiver.wait_for(1) and len(rig.receiver.requests) == 1
        assert rig.bodies()[0]["id"] == row.notification_id
        assert monitor.state.outbox("pending") == []
    finally:
        monitor.close()


def test_a_restarted_monitor_repeats_nothing_and_a_second_one_is_refused(rig: Rig) -> None:
    run_id = new_run(rig.client, rig.experiment_id)
    log_check(rig.client, run_id, 10, 5e-3, "alert")
    first = rig.monitor()
    try:
        first.run_once()
        with pytest.raises(MonitorLockedError):
            rig.monitor()
    finally:
        first.close()
    second = rig.monitor()
    try:
        log_check(rig.client, run_id, 20, 5e-3, "alert")  # still firing: no message
        log_check(rig.client, run_id, 30, 1e-8, "ok")
        second.run_once()
        assert [b["kind"] for b in rig.bodies()] == ["firing", "resolved"]
        assert second.state.outbox_counts() == {"pending": 0, "sent": 2, "dead": 0}
    finally:
        second.close()


def test_a_failed_poll_is_recorded_and_counted(rig: Rig, mlflow_fail_fast: None) -> None:
    from tests.support.mlflow_server import free_port

    monitor = rig.monitor(tracking_uri=f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(Exception, match=r"127\.0\.0\.1"):
            monitor.poll()
        assert monitor.health()["poll_errors"] == 1
        last = monitor.state.meta("last_poll")
        assert last is not None and last["error"] and last["runs"] == 0
    finally:
        monitor.close()


def test_a_poll_that_fails_after_the_search_is_counted_once(rig: Rig) -> None:
    from gradwatch import GradwatchError

    monitor = rig.monitor()
    monitor.state.close()  # the state database is gone: cursors cannot be read
    with pytest.raises(GradwatchError, match="closed"):
        monitor.poll()
    health = monitor.health()
    assert (health["polls"], health["poll_errors"]) == (1, 1)
    assert health["last_poll"].error and "closed" in health["last_poll"].error


def test_metrics_expose_the_latest_poll(rig: Rig) -> None:
    healthy = new_run(rig.client, rig.experiment_id, name="healthy")
    broken = new_run(rig.client, rig.experiment_id, name='we<ird "name"')
    log_check(rig.client, healthy, 10, 1e-8, "ok", layers=LAYERS_OK)
    log_check(rig.client, broken, 10, 2e-2, "alert", layers=LAYERS_BAD)
    log_check(rig.client, broken, 20, math.nan, "error", layers={"encoder.weight": math.inf})
    # the healthy run's check also measured the training kernels (bf16 autocast, say)
    log_precision(rig.client, healthy, 10, "ok", 1.3, {"encoder.weight": 1.3, "head.weight": 1.1})
    monitor = rig.monitor(prometheus={"enabled": True, "port": 1})
    server = MetricsServer(monitor, "127.0.0.1", 0)
    try:
        monitor.run_once()
        assert monitor.lease_tick()  # active again, as the service is between its polls
        with urllib.request.urlopen(server.url, timeout=10) as response:
            text = response.read().decode()
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        names = set()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                names.add(sample.name)
                samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value

        def value(name: str, run_id: str | None = None, **labels: str) -> float:
            found = [v for (n, ls), v in samples.items() if n == name and
                     (run_id is None or ("run_id", run_id) in ls) and
                     all((k, w) in ls for k, w in labels.items())]
            assert len(found) == 1, (name, run_id, labels, found)
            return found[0]

        assert value("gradwatch_rel_distance", healthy) == pytest.approx(1e-8)
        assert math.isnan(value("gradwatch_rel_distance", broken))
        assert value("gradwatch_check_verdict", broken) == 3
        assert value("gradwatch_layer_rel_distance", broken, layer="encoder.weight") == math.inf
        assert value("gradwatch_max_layer_rel_distance", broken) == pytest.approx(5e-3)
        assert value("gradwatch_check_non_finite", broken) == 0  # an error check
        assert value("gradwatch_alert_firing", broken, rule="error") == 1
        assert value("gradwatch_alert_firing", broken, rule="distance") == 0  # resolved by 20
        assert value("gradwatch_alert_firing", healthy, rule="distance") == 0
        assert value("gradwatch_last_check_step", broken) == 20
        assert value("gradwatch_last_check_timestamp_seconds", broken) == T0 + 20
        assert value("gradwatch_run_running", healthy) == 1
        assert value("gradwatch_threshold", level="alert") == 1e-3
        assert value("gradwatch_monitor_polls_total") == 1
        assert value("gradwatch_monitor_runs_watched") == 2
        assert value("gradwatch_monitor_active", replica=monitor.replica_id) == 1
        assert value("gradwatch_monitor_replica_heartbeat_timestamp_seconds",
                     replica=monitor.replica_id, role="active") > 0
        assert value("gradwatch_monitor_outbox_pending") == 0
        assert value("gradwatch_precision_ratio", healthy) == pytest.approx(1.3)
        assert value("gradwatch_layer_precision_ratio", healthy,
                     layer="head.weight") == pytest.approx(1.1)
        assert value("gradwatch_precision_verdict", healthy) == 0
        assert value("gradwatch_alert_firing", healthy, rule="kernels") == 0
        assert not [n for (n, ls) in samples if n.startswith("gradwatch_precision")
                    and ("run_id", broken) in ls]  # no measurement: no series
        assert ("run_name", 'we<ird "name"') in next(
            ls for (n, ls) in samples if n == "gradwatch_run_running" and ("run_id", broken) in ls)
        # the names and labels the Prometheus rules and the Grafana dashboard are written
        # against (dashboards/metrics.json); stale_multiple is absent with staleness off
        contract = json.loads(
            (Path(__file__).resolve().parents[2] / "dashboards" / "metrics.json").read_text())
        documented = {m["name"]: set(m["labels"]) for m in contract["metrics"]}
        assert names == set(documented) - {"gradwatch_stale_multiple"}
        for (name, labels), _ in samples.items():
            assert {k for k, _ in labels} == documented[name], name
    finally:
        server.close()
        monitor.close()


def test_a_second_state_opener_without_the_lock_can_read_status(rig: Rig) -> None:
    run_id = new_run(rig.client, rig.experiment_id)
    log_check(rig.client, run_id, 10, 5e-3, "alert")
    monitor = rig.monitor()
    try:
        monitor.run_once()
        with MonitorState(rig.state_url, lock=False) as reader:
            (stored,) = reader.alerts(run_id)
            assert stored.rule == "distance" and stored.state.state == "firing"
            last = reader.meta("last_poll")
            assert last is not None and last["transitions"] == 1
    finally:
        monitor.close()


def test_a_run_that_ended_before_the_history_window_is_not_replayed(rig: Rig) -> None:
    import time

    old = new_run(rig.client, rig.experiment_id, name="old")
    recent = new_run(rig.client, rig.experiment_id, name="recent")
    for run_id in (old, recent):
        log_check(rig.client, run_id, 10, 5e-3, "alert")
    rig.client.set_terminated(old, "FINISHED", end_time=int((time.time() - 7200) * 1000))
    rig.client.set_terminated(recent, "FINISHED")
    rig.clock.now = time.time()
    monitor = rig.monitor(history_window=3600)
    try:
        summary, _ = monitor.run_once()
        assert summary.runs == 2 and summary.new_checks == 1
        assert [b["run_id"] for b in rig.bodies()] == [recent]
        assert monitor.state.alerts(old) == []
    finally:
        monitor.close()


def test_a_planted_bug_logged_by_the_real_callback_is_announced_with_its_layer(
    rig: Rig, tmp_path: Path
) -> None:
    from gradwatch import GradWatch
    from tests.watch.test_callback_loop import loss_fn, train

    watch = GradWatch(every=5, loss_fn=loss_fn, tracking_uri=rig.server_url,
                      experiment_name=rig.experiment, spool_dir=tmp_path / "spool", budget=500)
    _, reports = train(watch, 20, wrong_between=(8, 13))  # wrong weight gradient at step 10
    assert [r.verdict for r in reports] == ["ok", "ok", "alert", "ok", "ok"]
    monitor = rig.monitor()
    try:
        summary, sent = monitor.run_once()
        assert summary.new_checks == 5 and sent.sent == 2
        firing, resolved = rig.bodies()
        assert (firing["kind"], firing["step"], resolved["kind"], resolved["step"]) == (
            "firing", 10, "resolved", 15)
        assert firing["run_id"] == watch.run_id
        assert firing["details"]["worst_layers"][0]["layer"] == "3.weight"
    finally:
        monitor.close()


def test_an_apprise_channel_gets_apprise_s_own_payload(rig: Rig) -> None:
    run_id = new_run(rig.client, rig.experiment_id, name="via-apprise")
    log_check(rig.client, run_id, 10, 5e-3, "alert")
    config = rig.config(channels={"hook": {"url_env": HOOK_ENV},
                                  "apprise": {"url_env": "APPRISE_URL"}})
    monitor = Monitor(config, clock=rig.clock, environ={
        HOOK_ENV: rig.receiver.url("/hook"),
        "APPRISE_URL": f"json://127.0.0.1:{rig.receiver.port}/ap"})
    try:
        _, sent = monitor.run_once()
        assert sent.sent == 2 and rig.receiver.wait_for(2)
        by_path = {r.path: r.json() for r in rig.receiver.requests}
        assert by_path["/hook"]["kind"] == "firing"
        assert "via-apprise" in by_path["/ap"]["title"]  # apprise's own JSON: title, message
        assert by_path["/ap"]["type"] == "failure"
    finally:
        monitor.close()


def test_a_first_poll_over_many_runs_reads_their_histories_in_bulk(rig: Rig) -> None:
    from tests.support.mlflow_runs import CountingClient

    run_ids = [new_run(rig.client, rig.experiment_id, name=f"many-{i}") for i in range(6)]
    for run_id in run_ids:
        log_check(rig.client, run_id, 10, 1e-8, "ok", layers=LAYERS_OK)
        log_check(rig.client, run_id, 20, 2e-2, "alert", layers=LAYERS_BAD)
    counting = CountingClient(rig.client)
    monitor = Monitor(rig.config(), client=counting, clock=rig.clock,
                      environ={HOOK_ENV: rig.receiver.url("/hook")})
    try:
        summary, sent = monitor.run_once()
        assert (summary.new_checks, sent.sent) == (12, 6)
        assert counting.calls["get_metric_history"] == 0  # 6 keys x 1 bulk call instead of 36
        assert sorted(b["run_id"] for b in rig.bodies()) == sorted(run_ids)
        assert all(b["details"]["worst_layers"][0]["layer"] == "encoder.weight"
                   for b in rig.bodies())
    finally:
        monitor.close()


def test_a_notification_for_a_channel_no_longer_configured_is_kept_dead(rig: Rig) -> None:
    monitor = rig.monitor()
    try:
        monitor.state.enqueue("n-gone", "gone", '{"id": "n-gone", "kind": "firing", '
                                                '"title": "t"}')
        result = monitor.send_due()
        assert (result.sent, result.failed, result.dead) == (0, 1, 1)
        (row,) = monitor.state.outbox("dead")
        assert "'gone' is no longer in the monitor's config" in (row.last_error or "")
        assert rig.receiver.requests == []
    finally:
        monitor.close()


def test_a_training_kernels_alert_fires_its_own_rule_named_by_its_measurement(rig: Rig) -> None:
    """Real checks of a float32 model whose custom op's backward is 1% wrong outside float64,
    written by the real record writer: the definition reads ok, the training kernels alert;
    one "kernels" alert per run (not a "distance" one), naming the measurement and listing
    the worst layers by ratio. A definition alert in another run names its measurement."""
    from tests.record.kernel_runs import kernel_report
    from tests.support.dashboard_runs import write_run

    bad, good = kernel_report(faulty=True), kernel_report(faulty=False)
    run_id = write_run(rig.client, rig.experiment_id,
                       [(10, good), (20, bad), (30, bad), (40, good)], name="bf16-op")
    other = new_run(rig.client, rig.experiment_id, name="definition-bug")
    log_check(rig.client, other, 10, 2e-2, "alert", layers=LAYERS_BAD)
    monitor = rig.monitor()
    try:
        summary, sent = monitor.run_once()
        assert (summary.new_checks, sent.sent) == (5, 3)
        bodies = {(b["run_id"], b["details"]["rule"], b["kind"]): b for b in rig.bodies()}
        assert set(bodies) == {(run_id, "kernels", "firing"), (run_id, "kernels", "resolved"),
                               (other, "distance", "firing")}
        firing = bodies[run_id, "kernels", "firing"]
        assert firing["id"] == transition_id(f"{run_id}/kernels", "firing", 20)
        assert firing["step"] == 20 and firing["severity"] == "critical"
        assert firing["details"]["measurement"] == "training kernels"
        assert "training kernels" in firing["title"] and "bf16-op" in firing["title"]
        assert "measurement: training kernels" in firing["body"]
        precision = firing["details"]["precision"]
        assert precision["verdict"] == "alert" and precision["ratio"] > 1e3
        assert [w["layer"] for w in precision["worst_layers"][:2]] == ["first.weight",
                                                                        "first.bias"]
        assert "worst layers by ratio: first.weight" in firing["body"]
        resolved = bodies[run_id, "kernels", "resolved"]
        assert resolved["step"] == 40 and resolved["details"]["fired_at_step"] == 20
        assert "training kernels" in resolved["title"]
        definition = bodies[other, "distance", "firing"]
        assert definition["details"]["measurement"] == "backprop definition"
        assert "backprop definition" in definition["title"]
        assert "measurement: backprop definition" in definition["body"]
        assert "precision" not in definition["details"]  # that run has no such measurement
        stored = monitor.state.alert(run_id, "kernels")
        assert stored is not None and stored.last_transition == "resolved"
        assert monitor.state.alert(run_id, "distance") is None  # the definition never alerted
    finally:
        monitor.close()


def test_a_failed_kernels_measurement_fires_error_and_keeps_judging_distances(rig: Rig) -> None:
    """The kernels measurement's "error" is folded into gradwatch/verdict, so the "error" rule
    announces it (naming that measurement); the check's distances were measured, so a running
    distance alert neither resolves nor is hidden. A non-finite ratio fires "kernels"."""
    run_id = new_run(rig.client, rig.experiment_id, name="fp16")
    log_check(rig.client, run_id, 10, 5e-3, "alert")
    log_precision(rig.client, run_id, 10, "ok", 1.2)
    log_check(rig.client, run_id, 20, 5e-3, "error")  # the kernels failed; the distance stands
    log_precision(rig.client, run_id, 20, "error", None)
    log_check(rig.client, run_id, 30, 1e-8, "ok")
    log_precision(rig.client, run_id, 30, "ok", 1.1)
    log_check(rig.client, run_id, 40, 1e-8, "warn")
    log_precision(rig.client, run_id, 40, "warn", math.inf, {"encoder.weight": math.inf})
    monitor = rig.monitor()
    try:
        monitor.run_once()
        kinds = [(b["details"]["rule"], b["kind"], b["step"]) for b in rig.bodies()]
        assert kinds == [("distance", "firing", 10), ("error", "firing", 20),
                         ("distance", "resolved", 30), ("error", "resolved", 30),
                         ("kernels", "firing", 40)]
        error = rig.bodies()[1]
        assert error["details"]["measurement"] == "training kernels"
        assert "(training kernels)" in error["title"]
        assert "could not run" in error["body"]
        assert error["details"]["precision"]["verdict"] == "error"
        kernels = rig.bodies()[4]
        assert kernels["details"]["precision"]["ratio"] == "inf"
        assert kernels["details"]["precision"]["worst_layers"] == [
            {"layer": "encoder.weight", "ratio": "inf"}]
    finally:
        monitor.close()


class CountingClient:
    """The real MLflow client, counting the rows each `search_runs` call returns (what an
    idle poll costs: the issue's scale target is about these rows)."""

    def __init__(self, client: MlflowClient) -> None:
        self.client = client
        self.rows: list[int] = []

    def search_runs(self, *args: Any, **kwargs: Any) -> Any:
        page = self.client.search_runs(*args, **kwargs)
        self.rows.append(len(page))
        return page

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def test_between_sweeps_a_poll_searches_only_runs_that_can_have_news(rig: Rig) -> None:
    """With a sweep every hour: finished runs are not searched again, yet a run that ends,
    a run that starts and ends between two polls, and (after the background sweep) a check
    logged to a run long after it ended are all read. The monitor reads the real time here
    (start times are the server's); its one-minute margin for clock skew is set to 0 so that
    the runs created a moment before the first poll do not come back."""
    import time

    class Later:
        def __init__(self) -> None:
            self.offset = 0.0

        def __call__(self) -> float:
            return time.time() + self.offset

    finished = []
    for index in range(6):  # runs that ended before the monitor started: the idle majority
        run_id = new_run(rig.client, rig.experiment_id, name=f"old-{index}")
        log_check(rig.client, run_id, 10, 1e-8, "ok")
        rig.client.set_terminated(run_id)
        finished.append(run_id)
    running = new_run(rig.client, rig.experiment_id, name="running")
    log_check(rig.client, running, 10, 1e-8, "ok")
    counting, clock = CountingClient(rig.client), Later()
    monitor = Monitor(rig.config(sweep_interval=3600, history_window=math.inf),
                      client=counting, clock=clock, environ={HOOK_ENV: rig.receiver.url()})
    monitor.start_margin = 0.0
    try:
        assert monitor.poll().runs == 7 and sum(counting.rows) == 7  # the first poll: a sweep
        counting.rows.clear()
        time.sleep(0.01)
        assert monitor.poll().runs == 7
        assert sum(counting.rows) == 1  # only the running run came back

        log_check(rig.client, running, 20, 5e-3, "alert")  # then the run ends
        rig.client.set_terminated(running)
        short = new_run(rig.client, rig.experiment_id, name="short")  # starts and ends
        log_check(rig.client, short, 10, 5e-3, "alert")
        rig.client.set_terminated(short)
        summary = monitor.poll()
        assert summary.runs == 8 and summary.transitions == 2
        monitor.send_due()
        assert {r.json()["run_id"] for r in rig.receiver.requests} == {running, short}

        log_check(rig.client, finished[0], 30, 5e-3, "alert")  # late, to an ended run
        assert monitor.poll().transitions == 0  # not searched between sweeps
        clock.offset = 3601
        assert monitor.poll().transitions == 0  # starts the sweep in the background
        sweep = monitor._sweep
        assert sweep is not None
        sweep.result(timeout=60)
        assert monitor.poll().transitions == 1  # the sweep's runs merged: the check is read
    finally:
        monitor.close()


def test_a_sigterm_while_the_scheduler_updates_a_job_stops_the_service_cleanly(rig: Rig) -> None:
    """SIGTERM lands on the main thread wherever it is; here, inside APScheduler's pass over
    due jobs, between taking the poll job from the memory job store and writing its next run
    time back. A shutdown run by the handler there empties the store under that pass, which
    then fails on the job it lost (the IndexError a CI run met at SIGTERM); the service must
    instead finish the pass, stop, and hand its lease back."""
    import signal
    import threading

    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.jobstores.memory import MemoryJobStore
    from apscheduler.schedulers.blocking import BlockingScheduler

    class SignalledStore(MemoryJobStore):  # type: ignore[misc]
        signalled = False

        def update_job(self, job: Any) -> None:
            if not self.signalled and threading.current_thread() is threading.main_thread():
                self.signalled = True
                signal.raise_signal(signal.SIGTERM)  # the handler runs before this returns
            super().update_job(job)

    store = SignalledStore()
    scheduler = BlockingScheduler(
        jobstores={"default": store},
        executors={"default": ThreadPoolExecutor(max_workers=1),
                   "lease": ThreadPoolExecutor(max_workers=1)},
        job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": 1})
    monitor = rig.monitor()
    before = signal.getsignal(signal.SIGTERM)
    try:
        monitor.run_forever(scheduler=scheduler)  # returns once stopped; raised before the fix
    finally:
        monitor.close()
    assert store.signalled, "the job store never saw the scheduler's pass"
    assert monitor.role == "standby", "the lease was not handed back at the stop"
    assert signal.getsignal(signal.SIGTERM) is before, "the SIGTERM handler was not restored"
