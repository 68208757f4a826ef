"""The monitor's Prometheus exposition: ``GET /metrics`` on 127.0.0.1 by default.

Every value comes from the monitor's latest poll (no MLflow call per scrape). The names, types
and labels are the contract in ``dashboards/metrics.json``, which the Prometheus rules and the
Grafana dashboard in ``dashboards/`` are written against; a test keeps the three in step.

Per run (labels ``run_id``, ``run_name``, ``experiment_id``)::

    gradwatch_rel_distance                       latest overall distance (NaN: an error check)
    gradwatch_layer_rel_distance{layer}          latest distance per layer
    gradwatch_max_layer_rel_distance             largest finite layer distance of that check
    gradwatch_check_verdict                      0 ok, 1 warn, 2 alert, 3 error
    gradwatch_check_non_finite                   1 when a distance is NaN/±inf (not an error)
    gradwatch_last_check_step, gradwatch_last_check_timestamp_seconds
    gradwatch_expected_check_interval_seconds    absent while unknown
    gradwatch_run_running                        1 while the MLflow run is RUNNING
    gradwatch_alert_firing{rule}                 1 while the monitor's alert is firing
    gradwatch_precision_ratio                    latest training-kernels ratio (largest layer)
    gradwatch_layer_precision_ratio{layer}       latest training-kernels ratio per layer
    gradwatch_precision_verdict                  the training-kernels verdict, 0 … 3

The three precision series exist only for runs whose checks measured the training kernels
(a float32 model on CPU has nothing to measure: no series).

and ``gradwatch_threshold{level}``, ``gradwatch_stale_multiple``, ``gradwatch_monitor_*``.

Imports: gradwatch.common, gradwatch.record (layout), monitor.service, config and rules.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from gradwatch.common.errors import ConfigError, missing_dependency
from gradwatch.monitor.config import RULES
from gradwatch.monitor.rules import definition_failed
from gradwatch.record.layout import (
    LAYER_PREFIX,
    PRECISION_LAYER_PREFIX,
    PRECISION_RATIO,
    PRECISION_VERDICT,
    REL_DISTANCE,
    VERDICT,
)

if TYPE_CHECKING:
    from gradwatch.monitor.service import Monitor

__all__ = ["MetricsServer", "collect", "serve_metrics"]

RUN_LABELS = ("run_id", "run_name", "experiment_id")


def collect(monitor: Monitor) -> Iterator[Any]:
    """The metric families of `monitor`'s latest poll (a prometheus_client collector body)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    def gauge(name: str, doc: str, labels: tuple[str, ...] = RUN_LABELS) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=list(labels))

    overall = gauge("gradwatch_rel_distance", "Latest overall relative distance "
                    "||g_num - g|| / (||g_num|| + ||g||) of the run's gradient check.")
    layer = gauge("gradwatch_layer_rel_distance", "Latest relative distance per layer.",
                  (*RUN_LABELS, "layer"))
    max_layer = gauge("gradwatch_max_layer_rel_distance",
                      "Largest finite layer distance of the latest check.")
    verdict = gauge("gradwatch_check_verdict", "Latest verdict: 0 ok, 1 warn, 2 alert, 3 error.")
    non_finite = gauge("gradwatch_check_non_finite",
                       "1 when the latest check had a NaN or infinite distance.")
    step = gauge("gradwatch_last_check_step", "Training step of the latest check.")
    stamp = gauge("gradwatch_last_check_timestamp_seconds", "Unix time of the latest check.")
    interval = gauge("gradwatch_expected_check_interval_seconds",
                     "Seconds expected between two checks.")
    running = gauge("gradwatch_run_running", "1 while the MLflow run is RUNNING.")
    firing = gauge("gradwatch_alert_firing", "1 while the monitor's alert for the rule fires.",
                   (*RUN_LABELS, "rule"))
    ratio = gauge("gradwatch_precision_ratio", "Latest training-kernels ratio (largest layer): "
                  "training gradient error / error of a correct computation at its precision.")
    layer_ratio = gauge("gradwatch_layer_precision_ratio",
                        "Latest training-kernels ratio per layer.", (*RUN_LABELS, "layer"))
    precision_verdict = gauge("gradwatch_precision_verdict", "Latest training-kernels "
                              "verdict: 0 ok, 1 warn, 2 alert, 3 error.")
    snapshot = monitor.snapshot()
    for snap in snapshot.values():
        run = snap.run
        labels = [run.run_id, run.name or run.run_id, run.experiment_id]
        latest = run.latest
        layers = {k.removeprefix(LAYER_PREFIX): v for k, v in latest.items()
                  if k.startswith(LAYER_PREFIX)}
        distance = latest.get(REL_DISTANCE)
        code = latest.get(VERDICT)
        if distance is not None:
            overall.add_metric(labels, distance)
            values = [distance, *layers.values()]
            failed = definition_failed(code, latest.get(PRECISION_VERDICT), distance)
            non_finite.add_metric(labels, float(
                not failed and any(not math.isfinite(v) for v in values)))
        for name, value in sorted(layers.items()):
            layer.add_metric([*labels, name], value)
        finite = [v for v in layers.values() if math.isfinite(v)]
        if finite:
            max_layer.add_metric(labels, max(finite))
        if code is not None and math.isfinite(code):
            verdict.add_metric(labels, code)
        if run.last_step is not None:
            step.add_metric(labels, float(run.last_step))
        if snap.last_check_at is not None:
            stamp.add_metric(labels, snap.last_check_at)
        if snap.interval is not None:
            interval.add_metric(labels, snap.interval)
        running.add_metric(labels, float(run.status == "RUNNING"))
        for rule in RULES:
            firing.add_metric([*labels, rule], float(rule in snap.firing))
        _precision(latest, labels, ratio, layer_ratio, precision_verdict)
    yield from (overall, layer, max_layer, verdict, non_finite, step, stamp, interval, running,
                firing, ratio, layer_ratio, precision_verdict)

    config = monitor.config
    threshold = GaugeMetricFamily("gradwatch_threshold", "The monitor's thresholds.",
                                  labels=["level"])
    threshold.add_metric(["warn"], config.thresholds.warn)
    threshold.add_metric(["alert"], config.thresholds.alert)
    yield threshold
    if config.staleness.enabled:  # absent when disabled: the Prometheus stale rule stays quiet
        yield GaugeMetricFamily("gradwatch_stale_multiple", "A running run is stale after "
                                "this many expected intervals without a check.",
                                value=config.staleness.multiple)

    health = monitor.health()
    last = health["last_poll"]
    yield GaugeMetricFamily("gradwatch_monitor_up", "1 while the monitor serves metrics.",
                            value=1.0)
    yield CounterMetricFamily("gradwatch_monitor_polls", "Polls since the monitor started.",
                              value=health["polls"])
    yield CounterMetricFamily("gradwatch_monitor_poll_errors", "Polls that failed.",
                              value=health["poll_errors"])
    if last is not None:
        yield GaugeMetricFamily("gradwatch_monitor_last_poll_timestamp_seconds",
                                "Unix time the latest poll started.", value=last.started_at)
        yield GaugeMetricFamily("gradwatch_monitor_poll_duration_seconds",
                                "Seconds the latest poll took.", value=last.seconds)
    yield GaugeMetricFamily("gradwatch_monitor_runs_watched", "Runs found by the latest poll.",
                            value=len(snapshot))
    yield from _replicas(monitor)
    outbox = monitor.outbox_counts()
    yield GaugeMetricFamily("gradwatch_monitor_outbox_pending",
                            "Notifications waiting to be sent.", value=outbox["pending"])
    yield GaugeMetricFamily("gradwatch_monitor_outbox_dead",
                            "Notifications given up after their retries.", value=outbox["dead"])


def _replicas(monitor: Monitor) -> Iterator[Any]:
    """This replica's role, and every replica's heartbeat as the state records it."""
    from prometheus_client.core import GaugeMetricFamily

    active = GaugeMetricFamily("gradwatch_monitor_active", "1 while this replica is the "
                               "active monitor (holds the lease), 0 as a standby.",
                               labels=["replica"])
    active.add_metric([monitor.replica_id], 1.0 if monitor.role == "active" else 0.0)
    yield active
    if monitor.active_since is not None:
        yield GaugeMetricFamily("gradwatch_monitor_active_since_timestamp_seconds",
                                "Unix time this replica became the active monitor.",
                                value=monitor.active_since)
    try:
        replicas = monitor.state.replicas()
    except Exception:  # the state is unreachable: the role above already says standby
        return
    heartbeat = GaugeMetricFamily("gradwatch_monitor_replica_heartbeat_timestamp_seconds",
                                  "Unix time of each replica's latest heartbeat, by role.",
                                  labels=["replica", "role"])
    for replica in replicas:
        heartbeat.add_metric([replica.replica_id, replica.role], replica.heartbeat_at)
    yield heartbeat


def _precision(latest: Mapping[str, float], labels: list[str], ratio: Any, layer_ratio: Any,
               verdict: Any) -> None:
    """A run's training-kernels series, from its latest values (none without them)."""
    if PRECISION_RATIO in latest:
        ratio.add_metric(labels, latest[PRECISION_RATIO])
    code = latest.get(PRECISION_VERDICT)
    if code is not None and math.isfinite(code):
        verdict.add_metric(labels, code)
    for key, value in sorted(latest.items()):
        if key.startswith(PRECISION_LAYER_PREFIX):
            layer_ratio.add_metric([*labels, key.removeprefix(PRECISION_LAYER_PREFIX)], value)


class _Collector:
    def __init__(self, monitor: Monitor) -> None:
        self._monitor = monitor

    def collect(self) -> Iterator[Any]:
        return collect(self._monitor)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape on stderr would drown the monitor's own log


class MetricsServer:
    """``/metrics`` for `monitor` on host:port (port 0: an ephemeral one, see `port`)."""

    def __init__(self, monitor: Monitor, host: str = "127.0.0.1", port: int = 9464) -> None:
        try:
            from prometheus_client import CollectorRegistry, make_wsgi_app
        except ImportError:
            raise missing_dependency("the monitor's Prometheus /metrics", "prometheus_client",
                                     "monitor") from None
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(monitor))  # duck-typed: collect() is all it needs
        try:
            self._server: WSGIServer = make_server(host, port, make_wsgi_app(registry),
                                                   handler_class=_QuietHandler)
        except OSError as error:
            raise ConfigError(
                f"prometheus: cannot listen on {host}:{port} ({error.strerror or error}); "
                f"pick a free port with [prometheus] port = ..., or set enabled = false."
            ) from None
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="gradwatch-metrics", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve_metrics(monitor: Monitor) -> MetricsServer | None:
    """Start the endpoint when ``[prometheus] enabled = true``, else None."""
    settings = monitor.config.prometheus
    if not settings.enabled:
        return None
    return MetricsServer(monitor, settings.host, settings.port)
