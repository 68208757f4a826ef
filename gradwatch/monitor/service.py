"""`gradwatch monitor`: one long-lived process that watches MLflow and notifies.

    BlockingScheduler (one worker thread: jobs never overlap)
      ├── "poll" every poll_interval ── find_runs ─▶ read_new_checks ─▶ rules ─▶ one
      │                                 transaction per run: alert states + outbox rows + cursor
      │                                 ─▶ then sends what is due
      └── "send" every send_interval ── outbox rows due ─▶ notifier.send ─▶ mark_sent/failed

Both jobs have ``max_instances=1`` and ``coalesce=True``; a poll that starts more than the
misfire grace late is skipped and reported (log, `gradwatch monitor status`, /metrics). A poll
that fails as a whole (MLflow unreachable) is logged, recorded and retried at the next interval;
a run that fails to read is skipped this poll, and the others go on.

Delivery is at-least-once with a stable id per transition (`gradwatch.monitor.state`): a
notification is in the outbox before it is sent and marked sent after, so a monitor killed in
between resends it on restart, with the same `Notification.id` for the receiver to drop.

Everything the monitor needs from outside is passed in (MLflow client, state, notifiers,
clock), so tests drive `poll()` and `send_due()` with a manual clock and real servers.

Imports: gradwatch.common, gradwatch.record (the reader), gradwatch.alerts, the monitor's
modules below it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from gradwatch.alerts.notify import Notification, Notifier
from gradwatch.alerts.redact import describe, scrub_urls
from gradwatch.alerts.state import AlertPolicy, AlertState, Transition
from gradwatch.common.errors import ConfigError, DeliveryError, MonitorStandbyError
from gradwatch.monitor import lease
from gradwatch.monitor.config import RULES, MonitorConfig
from gradwatch.monitor.lease import new_replica_id
from gradwatch.monitor.rules import (
    DEFINITION,
    ERROR_VERDICT,
    KERNELS,
    STALE,
    RuleOutcome,
    definition_failed,
    evaluate_checks,
    evaluate_stale,
    expected_interval,
    observed_interval,
    worst_kernel_layers,
    worst_layers,
)
from gradwatch.monitor.schema import parse_url, sqlite_file
from gradwatch.monitor.state import Clock, MonitorState
from gradwatch.monitor.stored import OutboxEntry
from gradwatch.record.layout import REL_DISTANCE
from gradwatch.record.reader import (
    CheckPoint,
    Cursor,
    MlflowReader,
    MonitoredRun,
    bulk_histories,
    find_runs,
    read_new_checks,
)

__all__ = ["Monitor", "PollSummary", "RunSnapshot", "SendSummary"]

logger = logging.getLogger("gradwatch.monitor")

_SEND_BATCH = 100
_BULK_FROM = 5  # runs with new checks in one poll from which their histories are read in bulk
_START_MARGIN = 60.0  # seconds of clock skew allowed between training hosts and the monitor
_IDS_PER_SEARCH = 100  # run ids in one `attributes.run_id IN (...)` search
_RULE_WORDS = {
    "distance": f"{DEFINITION}: gradient distance",
    "non_finite": f"{DEFINITION}: non-finite gradient distance",
    "error": "gradient check error",
    "kernels": f"{KERNELS}: gradient ratio",
    "stale": "no gradient check",
}
#: What each measurement compares, for the notification body.
_MEASUREMENT_HELP = {
    DEFINITION: "central differences against backprop on the float64 model",
    KERNELS: "the gradient as training computes it (its dtype, autocast, compiled graph, "
             "custom ops) against the float64 one, as a ratio to the error of a correct "
             "computation at that precision",
}


@dataclass(frozen=True)
class PollSummary:
    """What one poll did."""

    started_at: float
    seconds: float
    runs: int = 0
    new_checks: int = 0
    transitions: int = 0
    queued: int = 0
    silenced: int = 0
    failed_runs: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class SendSummary:
    """What one pass over the outbox did."""

    sent: int = 0
    failed: int = 0
    dead: int = 0


@dataclass(frozen=True)
class RunSnapshot:
    """One watched run as the latest poll saw it (for /metrics and the status table)."""

    run: MonitoredRun
    last_check_at: float | None
    interval: float | None
    firing: frozenset[str]


class Monitor:
    """Polls MLflow for gradwatch checks, applies the alert rules, and delivers notifications.

    Args:
        config: the validated settings (`load_config`).
        client: an `mlflow.MlflowClient` (default: one for `config.tracking_uri`).
        state: the durable state (default: `MonitorState(config.state_url)`, locked when it is
            a SQLite file, so a second monitor on it refuses to start).
        notifiers: channel name → notifier (default: `config.notifiers()`, which reads the
            secret URLs now and fails at once if one is missing).
        clock: Unix seconds (default `time.time`).
    """

    def __init__(
        self,
        config: MonitorConfig,
        *,
        client: MlflowReader | None = None,
        state: MonitorState | None = None,
        notifiers: Mapping[str, Notifier] | None = None,
        clock: Clock = time.time,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(config, MonitorConfig):
            raise ConfigError(f"config must be a MonitorConfig (from load_config), got "
                              f"{type(config).__name__}.")
        self.config = config
        self.clock = clock
        self.notifiers = dict(config.notifiers(environ) if notifiers is None else notifiers)
        if client is None:
            from mlflow import MlflowClient

            client = MlflowClient(config.tracking_uri)
        self.client: MlflowReader = client
        if state is None:
            locked = sqlite_file(parse_url(config.state_url)) is not None
            state = MonitorState(config.state_url, lock=locked, clock=clock)
        self.state = state
        self.policies: dict[str, AlertPolicy] = {rule: config.policy_for(rule) for rule in RULES}
        self.polls = 0
        self.poll_errors = 0
        self.misses = 0
        self.last_poll: PollSummary | None = None
        self._snapshot: dict[str, RunSnapshot] = {}
        self._experiment_names: dict[str, str] = {}
        self._run_names: dict[str, str] = {}
        self._outbox_counts = {"pending": 0, "sent": 0, "dead": 0}
        self._lock = threading.Lock()  # guards the snapshot and counters for /metrics
        # one active replica among those on this state (`gradwatch.monitor.lease`)
        self.replica_id = new_replica_id()
        self.started_at = clock()
        self.role = "starting"  # then "active" or "standby"
        self.active_since: float | None = None
        # the runs as the searches saw them (`_find_runs`)
        self._known: dict[str, MonitoredRun] | None = None
        self._running: set[str] = set()
        self._swept_at = float("-inf")
        self._searched_at = float("-inf")  # when `_find_runs` last searched
        self.start_margin = _START_MARGIN
        self._sweep: Future[list[MonitoredRun]] | None = None
        self._refreshed: dict[str, MonitoredRun] = {}
        self._sweeper = ThreadPoolExecutor(1, thread_name_prefix="gradwatch-sweep")

    def __repr__(self) -> str:
        return (f"Monitor(experiments={list(self.config.experiments)!r}, "
                f"channels={sorted(self.notifiers)!r}, state={self.state!r})")

    def close(self) -> None:
        self._sweeper.shutdown(wait=False, cancel_futures=True)
        self.state.close()

    # ------------------------------------------------------------------ the lease
    @property
    def lease_ttl(self) -> float:
        """How long a renewal keeps this replica active: 1.25 poll intervals (5 renewals)."""
        return 1.25 * self.config.poll_interval

    @property
    def renew_every(self) -> float:
        """Seconds between lease renewals (and a standby's looks): a quarter poll interval.
        A killed active replica's lease lapses ≤ 1.25 intervals after its last renewal and a
        standby looks every 0.25: the takeover comes ≤ 1.5 poll intervals after the kill."""
        return self.config.poll_interval / 4

    def lease_tick(self) -> bool:
        """Renew or take the lease and record this replica's heartbeat; True while active. A
        state that cannot be reached makes this replica a standby (it cannot renew: another
        takes over when the lease lapses, and it sends nothing meanwhile)."""
        try:
            active = lease.acquire(self.state, self.replica_id, self.lease_ttl,
                                   started_at=self.started_at)
        except Exception as error:
            logger.warning("could not renew the lease in the state (%s): standby",
                           scrub_urls(describe(error)))
            active = False
        with self._lock:
            before, self.role = self.role, "active" if active else "standby"
            if active and before != "active":
                self.active_since = self.clock()
            elif not active:
                self.active_since = None
        if active and before != "active":
            logger.info("replica %s is the active monitor", self.replica_id)
        elif not active and before != "standby":
            held = self._holder()
            logger.log(logging.WARNING if before == "active" else logging.INFO,
                       "replica %s is %s: %s", self.replica_id,
                       "no longer active (lease lost)" if before == "active" else "a standby",
                       held)
        return active

    def _holder(self) -> str:
        try:
            held = self.state.lease()
        except Exception:
            return "the state is not reachable"
        if held is None:
            return "no replica holds the lease"
        return f"replica {held.holder} holds the lease until {held.expires_at:.0f}"

    # ------------------------------------------------------------------ polling
    def poll(self) -> PollSummary:
        """One poll: every new check of every watched run through the rules; notifications
        written to the outbox (not sent: `send_due` does that). Raises when the run search
        itself fails (MLflow unreachable, unknown experiment); a run that fails alone is
        skipped and named in `PollSummary.failed_runs`. Every poll, failed or not, is recorded
        once: counted, and stored as the state's "last_poll"."""
        now = float(self.clock())
        started = time.perf_counter()
        try:
            summary = self._poll(now, started)
        except Exception as error:
            self._finish_poll(PollSummary(now, time.perf_counter() - started,
                                          error=scrub_urls(describe(error))))
            raise
        self._finish_poll(summary)
        return summary

    def _find_runs(self, now: float) -> list[MonitoredRun]:
        """The watched runs. At the first poll one search of every run; then every
        `sweep_interval` seconds such a search (a sweep) in the background, merged at the
        first poll after it finished, so no poll waits for it; and at every poll only what
        can have news is searched — runs running now, runs started since the previous search
        (a short run that started and ended between two polls), and runs that were running
        then (their last checks, their end). The other runs are kept as the last sweep saw
        them: their `gradwatch.last_step` is unchanged, so they cost nothing more. An idle
        poll over N runs of which R are running is then ~2 searches returning R rows, not
        ⌈N / 1000⌉ pages. A check logged to a run long after it ended (a spool delivered
        late) is read after the next sweep. `sweep_interval = 0`: every poll searches every
        run itself."""
        config, known = self.config, self._known
        if known is None or config.sweep_interval == 0:
            runs = self._search()
            self._known = {run.run_id: run for run in runs}
            self._swept_at = now
        else:
            known = self._merge_sweep(known)
            if self._sweep is None and now - self._swept_at >= config.sweep_interval:
                self._sweep, self._swept_at, self._refreshed = (
                    self._sweeper.submit(self._search), now, {})
            # margin: MLflow's start_time is the training host's clock; a minute of skew
            started_ms = int((self._searched_at - self.start_margin) * 1000)
            fresh = {run.run_id: run for where in (
                "attributes.status = 'RUNNING'", f"attributes.start_time >= {started_ms}")
                for run in self._search(where)}
            ended = sorted(self._running - fresh.keys())
            for chunk in range(0, len(ended), _IDS_PER_SEARCH):
                ids = ", ".join(f"'{run_id}'" for run_id in ended[chunk:chunk + _IDS_PER_SEARCH])
                fresh.update((run.run_id, run)
                             for run in self._search(f"attributes.run_id IN ({ids})"))
            known.update(fresh)
            self._refreshed.update(fresh)  # newer than what a running sweep will bring
            self._known = known
            runs = sorted(known.values(), key=lambda run: (run.start_time_ms or 0, run.run_id))
        self._searched_at = now
        self._running = {run.run_id for run in runs if run.status == "RUNNING"}
        return runs

    def _search(self, where: str | None = None) -> list[MonitoredRun]:
        return find_runs(self.client, self.config.experiments, tag_filter=self.config.tags,
                         where=where)

    def _merge_sweep(self, known: dict[str, MonitoredRun]) -> dict[str, MonitoredRun]:
        """A finished background sweep: its runs (deleted ones gone) with the runs searched
        since it started on top. A failed sweep is logged and tried again at the next poll."""
        sweep = self._sweep
        if sweep is None or not sweep.done():
            return known
        self._sweep = None
        try:
            swept = {run.run_id: run for run in sweep.result()}
        except Exception as error:
            logger.warning("the sweep of every run failed (tried again at the next poll): %s",
                           scrub_urls(describe(error)))
            self._swept_at = float("-inf")
            return known
        swept.update(self._refreshed)
        self._refreshed = {}
        return swept

    def _poll(self, now: float, started: float) -> PollSummary:
        runs = self._find_runs(now)
        cursors = {c.run_id: c for c in self.state.cursors()}
        states: dict[str, dict[str, AlertState]] = {}
        for stored in self.state.alerts():
            states.setdefault(stored.run_id, {})[stored.rule] = stored.state
        totals = {"new_checks": 0, "transitions": 0, "queued": 0, "silenced": 0}
        failed: dict[str, str] = {}
        snapshot: dict[str, RunSnapshot] = {}
        reads = self._read_all(runs, cursors)
        for run in runs:
            try:
                counts, cursor, run_states, interval = self._poll_run(
                    run, cursors.get(run.run_id), states.get(run.run_id, {}), now,
                    reads[run.run_id],
                )
            except Exception as error:  # one bad run must not stop the others
                failed[run.run_id] = scrub_urls(describe(error))
                logger.warning("run %s skipped this poll: %s", run.run_id, failed[run.run_id])
                cursor, run_states = cursors.get(run.run_id), states.get(run.run_id, {})
                interval = expected_interval(
                    run, cursor.check_interval if cursor else None, now=now)
            else:
                for key, value in counts.items():
                    totals[key] += value
            snapshot[run.run_id] = RunSnapshot(
                run=run, last_check_at=cursor.last_check_at if cursor else None,
                interval=interval,
                firing=frozenset(r for r, s in run_states.items() if s.state == "firing"),
            )
        summary = PollSummary(
            now, time.perf_counter() - started, runs=len(runs), failed_runs=failed,
            new_checks=totals["new_checks"], transitions=totals["transitions"],
            queued=totals["queued"], silenced=totals["silenced"],
        )
        with self._lock:
            self._snapshot = snapshot
        names = {run.run_id: run.name for run in runs}
        if names != self._run_names:  # for `gradwatch monitor status`; written when changed
            self._record_meta("run_names", names)
            self._run_names = names
        return summary

    def _read_all(
        self, runs: list[MonitoredRun], cursors: Mapping[str, Cursor]
    ) -> dict[str, Future[tuple[list[CheckPoint], Cursor]]]:
        """Start reading every run's new checks, `read_workers` at a time: a run with new
        checks costs one HTTP call per metric key, and those calls wait on the network."""
        cutoff_ms = (self.clock() - self.config.history_window) * 1000.0

        def skipped(run: MonitoredRun, cursor: Cursor | None) -> bool:
            # first sight of a run that ended long ago: its history is not news (a monitor
            # started on an old experiment must not replay every past alert); free
            return cursor is None and run.end_time_ms is not None and run.end_time_ms < cutoff_ms

        to_read = [run for run in runs if _has_news(run, cursors.get(run.run_id))
                   and not skipped(run, cursors.get(run.run_id))]
        # many runs with news (a first poll): their histories in bulk, one call per key per
        # 100 runs, when the tracking server offers it
        bulk = bulk_histories(self.client, to_read) if len(to_read) >= _BULK_FROM else None

        def read(run: MonitoredRun) -> tuple[list[CheckPoint], Cursor]:
            cursor = cursors.get(run.run_id)
            if skipped(run, cursor):
                return [], Cursor(run.run_id)
            histories = bulk.get(run.run_id) if bulk is not None else None
            return read_new_checks(self.client, run, cursor, histories=histories)

        with ThreadPoolExecutor(self.config.read_workers,
                                thread_name_prefix="gradwatch-read") as pool:
            return {run.run_id: pool.submit(read, run) for run in runs}

    def _poll_run(
        self, run: MonitoredRun, cursor: Cursor | None, states: dict[str, AlertState],
        now: float, read: Future[tuple[list[CheckPoint], Cursor]],
    ) -> tuple[dict[str, int], Cursor | None, dict[str, AlertState], float | None]:
        """One run's new checks through the rules, saved in one transaction; returns the
        counts, the run's cursor and alert states now, and its expected check interval."""
        checks, new_cursor = read.result()  # raises what the read raised
        alert = self.config.thresholds.alert
        outcome = evaluate_checks(run.run_id, checks, states, self.policies, alert)
        if checks:
            interval = observed_interval(
                cursor.check_interval if cursor else None,
                cursor.last_check_at if cursor else None, checks,
            )
            new_cursor = replace(new_cursor, check_interval=interval, polled_at=now)
        interval = expected_interval(run, new_cursor.check_interval, now=now)
        if self.config.staleness.enabled:
            stale = evaluate_stale(
                run, states.get(STALE), self.policies[STALE], now=now,
                last_check_at=new_cursor.last_check_at, interval=interval,
                multiple=self.config.staleness.multiple,
            )
            outcome.states.update(stale.states)
            outcome.transitions.extend(stale.transitions)
        counts = {"new_checks": len(checks), "transitions": len(outcome.transitions),
                  "queued": 0, "silenced": 0}
        if not checks and not outcome.states:
            return counts, cursor, states, interval  # nothing changed: no write
        entries, silenced = self._entries(run, outcome, interval, new_cursor)
        last_transition: dict[str, Transition] = {}
        for rule, transition, _check in outcome.transitions:
            last_transition[rule] = transition
        with self.state.transaction(now=now) as tx:
            for rule, state in outcome.states.items():
                tx.save_alert(run.run_id, rule, state, transition=last_transition.get(rule))
            counts["queued"] = sum(tx.enqueue(*entry) for entry in entries)
            if checks:
                tx.save_cursor(new_cursor)
        counts["silenced"] = silenced
        for rule, transition, _check in outcome.transitions:
            logger.info("run %s (%s): %s %s at step %s", run.run_id, run.name, rule,
                        transition.kind, transition.step)
        return (counts, new_cursor if checks else cursor, {**states, **outcome.states},
                interval)

    def _entries(
        self, run: MonitoredRun, outcome: RuleOutcome, interval: float | None, cursor: Cursor
    ) -> tuple[list[OutboxEntry], int]:
        entries: list[OutboxEntry] = []
        silenced = 0
        experiments = [run.experiment_id, self._experiment_name(run.experiment_id)]
        for rule, transition, check in outcome.transitions:
            silence = self.state.silenced_by(run.run_id, experiments, rule)
            if silence is not None:
                silenced += 1
                logger.info("run %s: %s %s silenced by silence %d (%s)", run.run_id, rule,
                            transition.kind, silence.id, silence.comment or "no comment")
                continue
            notification = self.notification(run, rule, transition, check,
                                              interval=interval, cursor=cursor)
            entries += OutboxEntry.for_channels(notification, sorted(self.notifiers))
        return entries, silenced

    def _finish_poll(self, summary: PollSummary) -> None:
        with self._lock:
            self.polls += 1
            self.poll_errors += summary.error is not None
            self.last_poll = summary
        try:
            self.state.set_meta("last_poll", summary.as_dict(), now=summary.started_at)
        except Exception as error:  # the record of a poll must not hide the poll's own result
            logger.warning("could not record the poll in the state: %s", describe(error))
        self._count_outbox()

    def _experiment_name(self, experiment_id: str) -> str:
        if experiment_id not in self._experiment_names:
            try:
                name = str(self.client.get_experiment(experiment_id).name)
            except Exception:
                return experiment_id  # a silence by name is retried at the next transition
            self._experiment_names[experiment_id] = name
        return self._experiment_names[experiment_id]

    # ------------------------------------------------------------------ messages
    def notification(
        self, run: MonitoredRun, rule: str, transition: Transition, check: CheckPoint | None,
        *, interval: float | None, cursor: Cursor,
    ) -> Notification:
        """The message of one transition: one per run and rule; a "distance" message lists
        the run's worst layers (the per-layer alerts are absorbed in it), a "kernels" one its
        worst layers by ratio. A check's message names the measurement that fired
        (`details["measurement"]`): "backprop definition" and/or "training kernels"."""
        name = run.name or run.run_id
        step = check.step if check is not None else cursor.last_step
        details: dict[str, Any] = {
            "rule": rule, "run_name": run.name, "experiment_id": run.experiment_id,
            "experiment": self._experiment_name(run.experiment_id),
            "fired_at_step": transition.fired_at_step if rule != STALE else None,
            "alert_threshold": self.config.thresholds.alert,
        }
        url = self._run_url(run)
        if url:
            details["run_url"] = url
        lines = [f"experiment {details['experiment']!r}, run {run.run_id}"]
        if check is not None:
            layers = worst_layers(check.layers)
            measurements = _measurements(rule, check)
            details.update(rel_distance=_json_number(check.rel_distance),
                           verdict=check.verdict_word,
                           worst_layers=[{"layer": n, "rel_distance": _json_number(v)}
                                         for n, v in layers],
                           measurement=" and ".join(measurements))
            lines += [f"measurement: {m} — {_MEASUREMENT_HELP[m]}" for m in measurements]
            if check.precision_verdict is not None:
                details["precision"] = _precision_details(check)
            if rule == "kernels":
                lines += _kernel_lines(check)
            else:
                lines.append(f"relative distance {_fmt(check.rel_distance)} at step "
                             f"{check.step} (alert ≥ {_fmt(self.config.thresholds.alert)})")
                if layers:
                    lines.append("worst layers: " + ", ".join(f"{n} {_fmt(v)}"
                                                              for n, v in layers))
                if rule == "error" and KERNELS in measurements:
                    lines.append(f"{KERNELS}: the measurement at training precision could "
                                 f"not run (its verdict is error); the run's check report "
                                 f"says why")
        else:
            age = None if cursor.last_check_at is None else transition.step - cursor.last_check_at
            details.update(last_check_step=cursor.last_step, last_check_at=cursor.last_check_at,
                           expected_interval_seconds=interval, run_status=run.status)
            lines.append(f"last check at step {cursor.last_step} "
                         f"({_ago(age)}); expected every {_duration(interval)}; "
                         f"run status {run.status}")
        if url:
            lines.append(url)
        title = self._title(name, rule, transition, check, run)
        return Notification(
            id=transition.id, kind=transition.kind, title=title, body="\n".join(lines),
            severity="info" if transition.kind == "resolved" else (
                "warning" if rule == STALE else "critical"),
            run_id=run.run_id, step=step, details=details,
        )

    def _title(self, name: str, rule: str, transition: Transition,
               check: CheckPoint | None, run: MonitoredRun) -> str:
        what = _RULE_WORDS[rule]
        if transition.kind == "resolved":
            if rule == STALE:
                why = "checks resumed" if run.status == "RUNNING" else f"run {run.status}"
                return f"gradwatch RESOLVED: run {name!r}: {what} alert ended ({why})"
            return (f"gradwatch RESOLVED: run {name!r}: {what} back to normal at step "
                    f"{transition.step} (fired at step {transition.fired_at_step})")
        prefix = "gradwatch ALERT" if transition.kind == "firing" else "gradwatch STILL FIRING"
        if rule == "distance" and check is not None:
            worst = max([check.rel_distance, *check.layers.values()],
                        key=lambda v: v if math.isfinite(v) else -1.0)
            return (f"{prefix}: run {name!r}: {DEFINITION}: gradient distance {_fmt(worst)} ≥ "
                    f"{_fmt(self.config.thresholds.alert)} at step {check.step}")
        if rule == "kernels" and check is not None:
            return (f"{prefix}: run {name!r}: {KERNELS}: gradient {_ratio(check.precision_ratio)}"
                    f"× farther from float64 than a correct computation at step {check.step}")
        if rule == "error" and check is not None:
            fired = " and ".join(_measurements(rule, check))
            return f"{prefix}: run {name!r}: {what} ({fired}) at step {transition.step}"
        if rule == STALE:
            return f"{prefix}: run {name!r} is RUNNING but has not checked its gradients lately"
        return f"{prefix}: run {name!r}: {what} at step {transition.step}"

    def _run_url(self, run: MonitoredRun) -> str | None:
        uri = self.config.tracking_uri or ""
        if not uri.startswith(("http://", "https://")):
            return None
        scheme, _, rest = uri.partition("://")
        host, slash, path = rest.partition("/")
        host = host.rpartition("@")[2]  # never a credential in a message
        base = f"{scheme}://{host}{slash}{path}".rstrip("/")
        return f"{base}/#/experiments/{run.experiment_id}/runs/{run.run_id}"

    # ------------------------------------------------------------------ sending
    def send_due(self, *, limit: int = 10_000) -> SendSummary:
        """Send every outbox row that is due now, oldest first; each is marked sent, or failed
        (retried later with backoff, "dead" after `max_attempts` or a permanent failure)."""
        sent = failed = dead = 0
        seen: set[int] = set()
        # only the replica holding the lease sends, and only rows it has claimed
        while sent + failed < limit and self.lease_tick():
            rows = [r for r in lease.claim_due(self.state, self.replica_id, limit=_SEND_BATCH)
                    if r.id not in seen]
            if not rows:
                break
            for row in rows:
                seen.add(row.id)
                notifier = self.notifiers.get(row.channel)
                try:
                    if notifier is None:
                        raise DeliveryError(
                            f"channel {row.channel!r} is no longer in the monitor's config; "
                            f"the notification is kept as dead: add the channel back and "
                            f"requeue it (MonitorState.requeue) to deliver it",
                            retryable=False,
                        )
                    notifier.send(_parse_payload(row.payload))
                except Exception as error:
                    retryable = getattr(error, "retryable", True)
                    retry_after = getattr(error, "retry_after", None)
                    marked = self.state.mark_failed(row.id, describe(error),
                                                    retryable=retryable, retry_after=retry_after)
                    failed += 1
                    dead += marked.status == "dead"
                    logger.warning("notification %s to %s failed (attempt %d%s): %s",
                                   row.notification_id, row.channel, marked.attempts,
                                   ", given up" if marked.status == "dead" else "",
                                   marked.last_error)
                else:
                    self.state.mark_sent(row.id)
                    sent += 1
        self._count_outbox()
        return SendSummary(sent=sent, failed=failed, dead=dead)

    def run_once(self) -> tuple[PollSummary, SendSummary]:
        """One poll, then send what is due (`gradwatch monitor --once`), holding the lease
        for it: refused (`MonitorStandbyError`) while another replica is active."""
        if not self.lease_tick():
            raise MonitorStandbyError(self._holder())
        try:
            summary = self.poll()
            return summary, self.send_due()
        finally:
            self._release()

    def _release(self) -> None:
        try:
            lease.release(self.state, self.replica_id)
        except Exception as error:
            logger.warning("could not release the lease (%s); it lapses in %g s",
                           scrub_urls(describe(error)), self.lease_ttl)
        with self._lock:
            self.role, self.active_since = "standby", None

    # ------------------------------------------------------------------ status
    def snapshot(self) -> dict[str, RunSnapshot]:
        """The watched runs as the latest poll saw them."""
        with self._lock:
            return dict(self._snapshot)

    def outbox_counts(self) -> dict[str, int]:
        """Outbox rows by status, as of the latest poll or send."""
        with self._lock:
            return dict(self._outbox_counts)

    def _count_outbox(self) -> None:
        try:
            counts = self.state.outbox_counts()
        except Exception as error:
            logger.warning("could not count the outbox: %s", describe(error))
            return
        with self._lock:
            self._outbox_counts = counts

    def health(self) -> dict[str, Any]:
        with self._lock:
            return {"polls": self.polls, "poll_errors": self.poll_errors,
                    "misses": self.misses, "last_poll": self.last_poll}

    # ------------------------------------------------------------------ the service
    def run_forever(self, *, scheduler: Any = None, install_signals: bool = True) -> None:
        """Poll and send on a `BlockingScheduler` until SIGTERM/SIGINT (or `scheduler`'s
        shutdown). The first poll runs at once."""
        from apscheduler.events import (
            EVENT_JOB_ERROR,
            EVENT_JOB_MAX_INSTANCES,
            EVENT_JOB_MISSED,
            JobEvent,
        )
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.blocking import BlockingScheduler

        grace = max(1, math.ceil(self.config.misfire_grace))
        if scheduler is None:
            scheduler = BlockingScheduler(
                # the lease on a thread of its own: a long poll must not let it lapse
                executors={"default": ThreadPoolExecutor(max_workers=1),
                           "lease": ThreadPoolExecutor(max_workers=1)},
                job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": grace},
            )

        def on_event(event: JobEvent) -> None:
            if event.code == EVENT_JOB_ERROR:
                # logged only: a failed poll has already counted and recorded itself
                logger.error("job %s failed: %s", event.job_id,
                             scrub_urls(describe(event.exception)))
            else:
                late = "missed its run time" if event.code == EVENT_JOB_MISSED else \
                    "is still running from the previous time"
                when = _scheduled_time(event)
                logger.warning("job %s %s (scheduled %s); the next one runs at its interval. "
                               "Raise poll_interval if polls take longer than it.",
                               event.job_id, late, when)
                with self._lock:
                    self.misses += 1
                self._record_meta("scheduler", {"misses": self.misses, "last_miss": str(when)})

        scheduler.add_listener(on_event, EVENT_JOB_ERROR | EVENT_JOB_MISSED |
                               EVENT_JOB_MAX_INSTANCES)
        self.lease_tick()  # the role before the first poll
        scheduler.add_job(self.lease_tick, "interval", seconds=self.renew_every, id="lease",
                          name="gradwatch lease", executor="lease")
        scheduler.add_job(self._poll_job, "interval", seconds=self.config.poll_interval,
                          id="poll", name="gradwatch poll",
                          next_run_time=datetime.now(timezone.utc))
        scheduler.add_job(self._send_job, "interval", seconds=self.config.send_interval,
                          id="send", name="gradwatch send")
        previous: dict[signal.Signals, Any] = {}
        stopper: list[threading.Thread] = []
        if install_signals and threading.current_thread() is threading.main_thread():
            def stop(signum: int, _frame: Any) -> None:
                # The handler runs on the main thread, which may be inside the scheduler's
                # `_process_jobs` holding its (re-entrant) job-store lock: a shutdown from here
                # empties the memory job store under that loop, which then fails on a job it has
                # just lost (an IndexError at SIGTERM). On a thread of its own the shutdown waits
                # for the lock, i.e. for the loop to finish its pass.
                logger.info("signal %d: stopping after the current job", signum)
                if not stopper:
                    stopper.append(threading.Thread(target=_shutdown, args=(scheduler,),
                                                    name="gradwatch-stop", daemon=True))
                    stopper[0].start()

            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, stop)
        logger.info("gradwatch monitor started: %s", self.config.describe())
        try:
            scheduler.start()
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            for thread in stopper:
                thread.join(30)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._release()  # a clean stop: a standby takes over at its next look
            logger.info("gradwatch monitor stopped")

    def _poll_job(self) -> None:
        if self.role != "active":
            return  # a standby: the active replica polls
        try:
            summary = self.poll()
        except ConfigError:
            raise  # e.g. an experiment deleted while we run: the listener logs it
        except Exception as error:
            logger.error("poll failed (retried in %g s): %s", self.config.poll_interval,
                         scrub_urls(describe(error)))
            return  # recorded by poll(); the counters and status show it
        if summary.transitions or summary.failed_runs:
            logger.info("poll: %d runs, %d new checks, %d transitions, %d queued, %d silenced, "
                        "%d runs failed", summary.runs, summary.new_checks,
                        summary.transitions, summary.queued, summary.silenced,
                        len(summary.failed_runs))
        self._send_job()

    def _send_job(self) -> None:
        if self.role != "active":
            return
        result = self.send_due()
        if result.sent or result.failed:
            logger.info("sent %d notifications, %d failed (%d given up)", result.sent,
                        result.failed, result.dead)

    def _record_meta(self, key: str, value: Mapping[str, Any]) -> None:
        try:
            self.state.set_meta(key, value)
        except Exception as error:
            logger.warning("could not record %s in the state: %s", key, describe(error))


# ---------------------------------------------------------------------------- helpers
def _has_news(run: MonitoredRun, cursor: Cursor | None) -> bool:
    """Whether `read_new_checks` would call MLflow for this run (see `_monitor_read`)."""
    if run.last_step is None:
        return REL_DISTANCE in run.latest  # no mark: read, unless no check was ever logged
    return cursor is None or cursor.last_step is None or run.last_step > cursor.last_step


def _parse_payload(payload: str) -> Notification:
    try:
        return Notification.model_validate_json(payload)
    except ValueError as error:
        raise DeliveryError(f"the stored payload is not a notification ({error})",
                            retryable=False) from None


def _measurements(rule: str, check: CheckPoint) -> list[str]:
    """The measurements a check rule's transition is about: "distance" and "non_finite" read
    the central differences, "kernels" the training precision; "error" names whichever
    failed (`definition_failed`)."""
    if rule == "kernels":
        return [KERNELS]
    if rule != "error":
        return [DEFINITION]
    failed = []
    if definition_failed(check.verdict, check.precision_verdict, check.rel_distance):
        failed.append(DEFINITION)
    if check.precision_verdict == ERROR_VERDICT:
        failed.append(KERNELS)
    return failed or [DEFINITION]


def _precision_details(check: CheckPoint) -> dict[str, Any]:
    ratio = check.precision_ratio
    return {
        "verdict": check.precision_verdict_word,
        "ratio": None if ratio is None else _json_number(ratio),
        "worst_layers": [{"layer": n, "ratio": _json_number(v)}
                         for n, v in worst_kernel_layers(check)],
    }


def _kernel_lines(check: CheckPoint) -> list[str]:
    """The body of a "kernels" message: the ratio and the worst layers by ratio."""
    lines = [f"ratio {_ratio(check.precision_ratio)} at step {check.step} (verdict "
             f"{check.precision_verdict_word or '?'}; training error / error of a correct "
             f"computation at the training precision: ~1 is right, the run's alert ratio "
             f"(default 32) and above is a wrong backward at that precision)"]
    layers = worst_kernel_layers(check)
    if layers:
        lines.append("worst layers by ratio: " + ", ".join(f"{n} {_ratio(v)}"
                                                         for n, v in layers))
    return lines


def _ratio(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.3g}" if math.isfinite(value) else str(value)


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _fmt(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.2e}" if math.isfinite(value) else str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    for unit, size in (("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


def _ago(seconds: float | None) -> str:
    return "never" if seconds is None else f"{_duration(seconds)} ago"


def _shutdown(scheduler: Any) -> None:
    from apscheduler.schedulers import SchedulerNotRunningError

    # stopped already: the scheduler's own shutdown, or a signal before it started
    with contextlib.suppress(SchedulerNotRunningError):
        scheduler.shutdown(wait=False)


def _scheduled_time(event: Any) -> Any:
    """When the job was due: a missed run's `JobExecutionEvent` carries `scheduled_run_time`;
    APScheduler 3's max-instances event is a `JobSubmissionEvent` carrying the list
    `scheduled_run_times` (the latest is the one that could not start)."""
    when = getattr(event, "scheduled_run_time", None)
    if when is None:
        times = getattr(event, "scheduled_run_times", None) or [None]
        when = times[-1]
    return when
