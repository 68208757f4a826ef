"""The monitor's durable state: run cursors, alert states, silences and the outbox.

The monitor's durable state: per-run cursors, alert states, silences and the notification outbox.

`gradwatch monitor` must survive being stopped at any point without losing or repeating a
notification for an alert transition. Everything it remembers lives here, in one SQL database
(SQLite by default; any SQLAlchemy URL is accepted), and every change that belongs together is
one transaction::

    poll ──▶ read new checks since the run's cursor ──▶ advance the alert state machines
                                                                   │
          ┌────────────────── one transaction ─────────────────────┘
          ▼
    cursor moved + alert states saved + one outbox row per (notification, channel)
          │
    sender ──▶ `due(now)` ──▶ send ──▶ `mark_sent` │ `mark_failed` (backoff, then "dead")

Why this is at-least-once, never more than that:

- A crash *before* the transaction commits leaves the cursor where it was: the next poll reads
  the same checks again and produces the same transitions with the same ids
  (`gradwatch.alerts.state.transition_id`), and `enqueue` ignores a (notification id, channel) it
  already holds. A crash *after* it leaves everything to send in the outbox.
- A crash between a send and its `mark_sent` leaves the row pending: it is sent again on
  restart, carrying the same `Notification.id`, so the receiver can drop the duplicate.
- A row that keeps failing is retried with exponential backoff, then marked "dead" after
  `max_attempts`, and kept with its last error (`outbox(status="dead")`, `requeue`).

Tables (names prefixed ``gradwatch_`` so a shared database can hold them beside others)::

    gradwatch_schema_version  version                        one row; a newer one is refused
    gradwatch_cursors         run_id PK, last_step, last_check_at, check_interval, polled_at
    gradwatch_cursor_metrics  (run_id, metric_key) PK, last_step
    gradwatch_alerts          (run_id, rule) PK, state, alerting_streak, clear_streak,
                              since_notified, active_since_step, fired_at_step,
                              last_notified_step, ever_fired, last_transition,
                              last_transition_step, last_transition_at, updated_at
    gradwatch_silences        id PK, run_id, experiment, rule (fnmatch globs, NULL: any),
                              created_at, expires_at, comment
    gradwatch_outbox          id PK, notification_id, channel, payload, status, attempts,
                              created_at, next_attempt_at, last_attempt_at, sent_at,
                              last_error, claimed_by, claimed_at; UNIQUE (notification_id,
                              channel)
    gradwatch_monitor_meta    key PK, value (JSON), updated_at: the last poll's outcome, ...
    gradwatch_lease           name PK, holder, acquired_at, renewed_at, expires_at: which
                              replica is active (`gradwatch.monitor.lease`)
    gradwatch_replicas        replica_id PK, host, pid, started_at, heartbeat_at, role

Times are Unix seconds (float) from the `clock` given to `MonitorState` (default `time.time`)
or passed as ``now=``; nothing here reads the clock otherwise, so tests use a manual one.

With a SQLite file, ``lock=True`` (the default) flocks ``<file>.lock`` so that a second monitor
on the same state refuses to start (`MonitorLockedError`); the lock goes with `close()`.

The values stored and handed back (`StoredAlert`, `OutboxEntry`, `OutboxRow`, `Silence`,
`SilenceMatcher`) are defined in `monitor.stored`.

Imports: gradwatch.common, gradwatch.record (the cursor), gradwatch.alerts, monitor.schema,
monitor.stored, monitor.lease.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from gradwatch.alerts.redact import scrub_urls
from gradwatch.alerts.state import AlertState, Transition
from gradwatch.common.errors import ConfigError, GradwatchError, InputError, MonitorLockedError
from gradwatch.common.files import acquire_pid_lock
from gradwatch.monitor import lease
from gradwatch.monitor.lease import Lease, Replica
from gradwatch.monitor.schema import (
    ERROR_LIMIT,
    NAME_LIMIT,
    OUR_TABLES,
    SCHEMA_VERSION,
    alerts_table,
    cursor_metrics_table,
    cursors_table,
    default_state_url,
    make_engine,
    meta_table,
    metadata,
    outbox_table,
    parse_url,
    schema_version_table,
    silences_table,
    sqlite_file,
    upgrade,
    upsert,
)
from gradwatch.monitor.stored import (
    OutboxEntry,
    OutboxRow,
    OutboxStatus,
    Silence,
    SilenceMatcher,
    StoredAlert,
    alert_from_row,
    outbox_from_row,
    silence_from_row,
)
from gradwatch.record.reader import Cursor

__all__ = [
    "Clock",
    "MonitorLockedError",
    "MonitorState",
    "StateTransaction",
    "default_state_url",
]

Clock = Callable[[], float]
"""Returns the current Unix time in seconds."""

# -- the store --------------------------------------------------------------------------------


class MonitorState:
    """The monitor's database: cursors, alert states, silences and the notification outbox.

    Args:
        url: a SQLAlchemy URL ("sqlite:////abs/path.db", "postgresql+psycopg://...") or the
            path of a SQLite file; default `default_state_url()`.
        lock: flock ``<file>.lock`` so that a second opener refuses (`MonitorLockedError`).
            Needs a SQLite file; pass False for a read-only look or another database.
        clock: Unix seconds, used wherever a method's ``now`` is not given.
        backoff_base, backoff_factor, backoff_cap: failed attempt n of a row waits
            min(backoff_cap, backoff_base · backoff_factorⁿ⁻¹) seconds before the next one.
        max_attempts: after this many failed attempts a row is marked "dead" (and kept).

    Example:
        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     path = os.path.join(directory, "state.db")
        ...     with MonitorState(path, clock=lambda: 100.0) as state:
        ...         state.enqueue("n-1", "ops", '{"id": "n-1"}'), state.enqueue("n-1", "ops", "{}")
        ...         [row.notification_id for row in state.due()]
        (True, False)
        ['n-1']
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | None = None,
        *,
        lock: bool = True,
        clock: Clock = time.time,
        backoff_base: float = 5.0,
        backoff_factor: float = 2.0,
        backoff_cap: float = 900.0,
        max_attempts: int = 12,
    ) -> None:
        _validate_backoff(backoff_base, backoff_factor, backoff_cap, max_attempts)
        if not callable(clock):
            raise ConfigError(f"clock must be a callable returning Unix seconds (default "
                              f"time.time), got {type(clock).__name__}.")
        self._url = parse_url(url)
        self.clock = clock
        self.backoff_base = float(backoff_base)
        self.backoff_factor = float(backoff_factor)
        self.backoff_cap = float(backoff_cap)
        self.max_attempts = max_attempts
        self._lock_fd: int | None = None
        self._engine: Engine | None = None
        database = sqlite_file(self._url)
        if lock and database is None:
            raise ConfigError(
                f"lock=True needs a SQLite file URL (sqlite:////path/monitor.db), got "
                f"{self._shown_url}. For another database pass lock=False: monitors share "
                f"it as replicas, one active at a time (gradwatch.monitor.lease)."
            )
        if database is not None:
            database.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if lock and database is not None:
            lock_path = database.with_name(database.name + ".lock")
            self._lock_fd = acquire_pid_lock(
                lock_path, lambda pid: MonitorLockedError(lock_path, pid)
            )
        try:
            self._engine = make_engine(self._url)
            self._open_schema(is_sqlite_file=database is not None)
        except BaseException:
            self.close()
            raise

    @property
    def exclusive(self) -> bool:
        """True while this object holds the SQLite file lock: no other monitor is running."""
        return self._lock_fd is not None

    @property
    def _shown_url(self) -> str:
        return self._url.render_as_string(hide_password=True)

    def __repr__(self) -> str:
        return f"MonitorState({self._shown_url!r}, locked={self._lock_fd is not None})"

    def __enter__(self) -> MonitorState:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the database connections and release the lock (idempotent)."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # -- transactions ---------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, *, now: float | None = None) -> Iterator[StateTransaction]:
        """One transaction: everything done through the yielded object commits together, or
        (on any exception) not at all."""
        with self._connection_begin() as connection:
            yield StateTransaction(self, connection, self._now(now))

    def record_transition(
        self,
        run_id: str,
        rule: str,
        state: AlertState,
        *,
        transition: Transition | None = None,
        notifications: Iterable[OutboxEntry] = (),
        cursor: Cursor | None = None,
        now: float | None = None,
    ) -> int:
        """Save an alert's new state, its notifications and (optionally) the run's cursor, in
        one transaction; returns how many outbox rows are new (0 for a replayed transition)."""
        with self.transaction(now=now) as tx:
            tx.save_alert(run_id, rule, state, transition=transition)
            created = sum(tx.enqueue(*entry) for entry in notifications)
            if cursor is not None:
                tx.save_cursor(cursor)
        return created

    # -- cursors and alert states ---------------------------------------------------------

    def save_cursor(self, cursor: Cursor) -> None:
        with self.transaction() as tx:
            tx.save_cursor(cursor)

    def cursor(self, run_id: str) -> Cursor | None:
        """The run's cursor, None for a run never read."""
        found = self.cursors([run_id])
        return found[0] if found else None

    def cursors(self, run_ids: Sequence[str] | None = None) -> list[Cursor]:
        """Cursors of `run_ids` (default: every run), ordered by run id."""
        query = sa.select(cursors_table).order_by(cursors_table.c.run_id)
        metric_query = sa.select(cursor_metrics_table)
        if run_ids is not None:
            query = query.where(cursors_table.c.run_id.in_(list(run_ids)))
            metric_query = metric_query.where(cursor_metrics_table.c.run_id.in_(list(run_ids)))
        with self._connection_begin() as connection:
            rows = connection.execute(query).all()
            steps: dict[str, dict[str, int]] = {}
            for metric in connection.execute(metric_query):
                steps.setdefault(metric.run_id, {})[metric.metric_key] = metric.last_step
        return [
            Cursor(run_id=row.run_id, last_step=row.last_step,
                   metric_steps=steps.get(row.run_id, {}), last_check_at=row.last_check_at,
                   check_interval=row.check_interval, polled_at=row.polled_at)
            for row in rows
        ]

    def alert(self, run_id: str, rule: str) -> StoredAlert | None:
        """The stored state of one alert, None if it was never saved."""
        found = [a for a in self.alerts(run_id) if a.rule == rule]
        return found[0] if found else None

    def alerts(self, run_id: str | None = None) -> list[StoredAlert]:
        """Stored alerts (of one run, or all), ordered by run id and rule."""
        query = sa.select(alerts_table).order_by(alerts_table.c.run_id, alerts_table.c.rule)
        if run_id is not None:
            query = query.where(alerts_table.c.run_id == run_id)
        with self._connection_begin() as connection:
            return [alert_from_row(row) for row in connection.execute(query)]

    # -- the monitor's own record ----------------------------------------------------------

    def lease(self) -> Lease | None:
        """Which replica holds the lease (`gradwatch.monitor.lease`), None before any did."""
        return lease.current(self)

    def replicas(self) -> list[Replica]:
        """Every monitor replica's latest heartbeat and role, oldest replica first."""
        return lease.replicas(self)

    def set_meta(self, key: str, value: Mapping[str, Any], *, now: float | None = None) -> None:
        """Store a small JSON object under `key` (e.g. "last_poll": the last poll's outcome),
        for `gradwatch monitor status` to show while the monitor runs."""
        _check_name("key", key)
        text = json.dumps(dict(value), allow_nan=False, default=str)
        with self._connection_begin() as connection:
            upsert(connection, meta_table, {"key": key},
                    {"value": text, "updated_at": self._now(now)})

    def meta(self, key: str) -> dict[str, Any] | None:
        """The object stored under `key`, None if none."""
        with self._connection_begin() as connection:
            text = connection.execute(
                sa.select(meta_table.c.value).where(meta_table.c.key == key)
            ).scalar_one_or_none()
        return None if text is None else cast(dict[str, Any], json.loads(text))

    # -- outbox ---------------------------------------------------------------------------

    def enqueue(self, notification_id: str, channel: str, payload: str) -> bool:
        """Write a notification for a channel before it is sent; True if new, False if this
        (notification id, channel) is already in the outbox (sent, pending or dead)."""
        with self.transaction() as tx:
            return tx.enqueue(notification_id, channel, payload)

    def due(self, now: float | None = None, *, limit: int = 100) -> list[OutboxRow]:
        """Pending rows whose next attempt is due (next_attempt_at ≤ now), oldest due first."""
        query = (
            sa.select(outbox_table)
            .where(outbox_table.c.status == "pending",
                   outbox_table.c.next_attempt_at <= self._now(now))
            .order_by(outbox_table.c.next_attempt_at, outbox_table.c.id)
            .limit(limit)
        )
        with self._connection_begin() as connection:
            return [outbox_from_row(row) for row in connection.execute(query)]

    def outbox(self, status: OutboxStatus | None = None) -> list[OutboxRow]:
        """Every outbox row (or those with `status`), in the order they were written."""
        query = sa.select(outbox_table).order_by(outbox_table.c.id)
        if status is not None:
            query = query.where(outbox_table.c.status == _check_status(status))
        with self._connection_begin() as connection:
            return [outbox_from_row(row) for row in connection.execute(query)]

    def pending_count(self) -> int:
        """How many rows still wait to be sent (dead rows are not pending)."""
        return self.outbox_counts()["pending"]

    def outbox_counts(self) -> dict[str, int]:
        """How many rows are pending, sent and dead."""
        query = sa.select(outbox_table.c.status, sa.func.count()).group_by(outbox_table.c.status)
        counts = {"pending": 0, "sent": 0, "dead": 0}
        with self._connection_begin() as connection:
            counts.update({status: int(n) for status, n in connection.execute(query)})
        return counts

    def mark_sent(self, outbox_id: int, *, now: float | None = None) -> OutboxRow:
        """Record that row `outbox_id` was delivered (a dead row delivered by hand included)."""
        with self._connection_begin() as connection:
            row = _get_outbox(connection, outbox_id)
            if row.status != "sent":
                connection.execute(
                    sa.update(outbox_table).where(outbox_table.c.id == outbox_id).values(
                        status="sent", sent_at=self._now(now), last_attempt_at=self._now(now),
                    )
                )
            return _get_outbox(connection, outbox_id)

    def mark_failed(
        self,
        outbox_id: int,
        error: str | BaseException,
        *,
        now: float | None = None,
        retryable: bool = True,
        retry_after: float | None = None,
    ) -> OutboxRow:
        """Record a failed attempt: back off, or mark the row "dead" once `max_attempts` are
        spent or when `retryable` is False (e.g. `DeliveryError.retryable`). A receiver's
        `retry_after` lengthens the wait, up to `backoff_cap`. A row already sent or dead is
        left as it is (a late report of an older attempt)."""
        moment = self._now(now)
        message = _error_text(error)
        with self._connection_begin() as connection:
            row = _get_outbox(connection, outbox_id)
            if row.status != "pending":
                return row
            attempts = row.attempts + 1
            values: dict[str, Any] = {
                "attempts": attempts, "last_attempt_at": moment, "last_error": message,
            }
            if not retryable or attempts >= self.max_attempts:
                values["status"] = "dead"
            else:
                values["next_attempt_at"] = moment + self.backoff_delay(attempts, retry_after)
            connection.execute(
                sa.update(outbox_table).where(outbox_table.c.id == outbox_id).values(values))
            return _get_outbox(connection, outbox_id)

    def backoff_delay(self, attempts: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the `attempts`-th failure (no jitter: one monitor, one sender).

        Example:
            >>> import tempfile, os
            >>> with tempfile.TemporaryDirectory() as d, MonitorState(os.path.join(d, "s.db"),
            ...         backoff_base=1, backoff_factor=3, backoff_cap=20) as state:
            ...     [state.backoff_delay(n) for n in (1, 2, 3, 4)], state.backoff_delay(1, 7)
            ([1.0, 3.0, 9.0, 20.0], 7.0)
        """
        # base·factorⁿ⁻¹ overflows float for large n; the cap is reached long before that.
        exponent = min(attempts - 1, 1024)
        try:
            delay = min(self.backoff_cap, self.backoff_base * self.backoff_factor**exponent)
        except OverflowError:
            delay = self.backoff_cap
        if retry_after is not None and math.isfinite(retry_after):
            delay = max(delay, min(float(retry_after), self.backoff_cap))
        return delay

    def requeue(self, outbox_id: int, *, now: float | None = None) -> OutboxRow:
        """Give a dead (or pending) row a fresh set of attempts, due now; its last error stays."""
        with self._connection_begin() as connection:
            row = _get_outbox(connection, outbox_id)
            if row.status != "sent":
                connection.execute(
                    sa.update(outbox_table).where(outbox_table.c.id == outbox_id).values(
                        status="pending", attempts=0, next_attempt_at=self._now(now),
                    )
                )
            return _get_outbox(connection, outbox_id)

    # -- silences -------------------------------------------------------------------------

    def add_silence(
        self,
        matcher: SilenceMatcher,
        *,
        duration: float | timedelta | None = None,
        expires_at: float | None = None,
        comment: str = "",
        now: float | None = None,
    ) -> int:
        """Mute the alerts `matcher` selects for `duration` seconds, or until `expires_at`;
        returns the silence's id."""
        if not isinstance(matcher, SilenceMatcher):
            raise ConfigError(f"matcher must be a SilenceMatcher, e.g. SilenceMatcher("
                              f"run_id='abc123', rule='stale'), got {type(matcher).__name__}.")
        moment = self._now(now)
        if (duration is None) == (expires_at is None):
            raise ConfigError(
                f"Give exactly one of duration (seconds or a timedelta) and expires_at (Unix "
                f"seconds), got duration={duration!r} and expires_at={expires_at!r}."
            )
        if duration is not None:
            seconds = duration.total_seconds() if isinstance(duration, timedelta) else duration
            expires_at = moment + _positive_seconds("duration", seconds)
        assert expires_at is not None
        if not (isinstance(expires_at, (int, float)) and math.isfinite(expires_at)
                and expires_at > moment):
            raise ConfigError(
                f"expires_at must be a Unix time after now ({moment}), got {expires_at!r}; "
                f"or pass duration=seconds."
            )
        with self._connection_begin() as connection:
            result = connection.execute(sa.insert(silences_table).values(
                run_id=matcher.run_id, experiment=matcher.experiment, rule=matcher.rule,
                created_at=moment, expires_at=float(expires_at), comment=str(comment),
            ))
            key = result.inserted_primary_key
            assert key is not None
            return int(key[0])

    def silences(self, *, active_only: bool = True, now: float | None = None) -> list[Silence]:
        """Silences (only those active now, by default), in the order they were added."""
        query = sa.select(silences_table).order_by(silences_table.c.id)
        if active_only:
            moment = self._now(now)
            query = query.where(silences_table.c.created_at <= moment,
                                silences_table.c.expires_at > moment)
        with self._connection_begin() as connection:
            return [silence_from_row(row) for row in connection.execute(query)]

    def expire_silence(self, silence_id: int, *, now: float | None = None) -> Silence:
        """End a silence now (it is kept, with its new expiry, for the record)."""
        moment = self._now(now)
        with self._connection_begin() as connection:
            row = connection.execute(
                sa.select(silences_table).where(silences_table.c.id == silence_id)
            ).one_or_none()
            if row is None:
                active = connection.execute(sa.select(silences_table.c.id).where(
                    silences_table.c.created_at <= moment, silences_table.c.expires_at > moment))
                known = ", ".join(str(silence_id) for (silence_id,) in active) or "none"
                raise InputError(
                    f"No silence with id {silence_id!r}; active silences: {known}. "
                    f"List them with `gradwatch monitor silence list`."
                )
            if row.expires_at > moment:
                connection.execute(sa.update(silences_table).where(
                    silences_table.c.id == silence_id).values(expires_at=moment))
            return silence_from_row(connection.execute(
                sa.select(silences_table).where(silences_table.c.id == silence_id)).one())

    def silenced_by(
        self, run_id: str, experiment: str | Iterable[str] | None, rule: str,
        *, now: float | None = None,
    ) -> Silence | None:
        """The first active silence that mutes this alert, else None. `experiment` may be
        the experiment's name, its id, or both (a silence on either matches)."""
        experiments = [experiment] if isinstance(experiment, str) else list(experiment or ())
        for silence in self.silences(active_only=True, now=now):
            if silence.matcher.matches(run_id, experiments, rule):
                return silence
        return None

    def is_silenced(
        self, run_id: str, experiment: str | Iterable[str] | None, rule: str,
        *, now: float | None = None,
    ) -> bool:
        """Whether an active silence mutes this (run, experiment, rule) alert."""
        return self.silenced_by(run_id, experiment, rule, now=now) is not None

    # -- internals ------------------------------------------------------------------------

    def _now(self, now: float | None) -> float:
        return float(self.clock() if now is None else now)

    @contextlib.contextmanager
    def _connection_begin(self) -> Iterator[Connection]:
        if self._engine is None:
            raise GradwatchError(
                f"{self!r} is closed; open a new MonitorState to use the state again."
            )
        with self._engine.begin() as connection:
            yield connection

    def _open_schema(self, *, is_sqlite_file: bool) -> None:
        """Create the tables on first open; refuse a newer schema or a foreign SQLite file."""
        with self._connection_begin() as connection:
            tables = set(sa.inspect(connection).get_table_names())
            version: int | None = None
            if schema_version_table.name in tables:
                version = connection.execute(
                    sa.select(sa.func.max(schema_version_table.c.version))
                ).scalar_one_or_none()
            elif is_sqlite_file and tables - OUR_TABLES:
                foreign = ", ".join(sorted(tables - OUR_TABLES)[:5])
                raise ConfigError(
                    f"The state URL {self._shown_url} points at a SQLite file that holds other "
                    f"tables ({foreign}, ...), not a gradwatch monitor state: is it the MLflow "
                    f"database? Give the monitor a file of its own, e.g. "
                    f"{default_state_url()}."
                )
            if version is not None and version > SCHEMA_VERSION:
                raise ConfigError(
                    f"The monitor state {self._shown_url} has schema version {version}, written "
                    f"by a newer gradwatch; this one reads up to version {SCHEMA_VERSION}. "
                    f"Upgrade gradwatch (pip install -U gradwatch), or point the monitor at a "
                    f"new state file."
                )
            if version is not None and version < SCHEMA_VERSION:
                upgrade(connection, version)  # columns first: create_all adds whole tables
            metadata.create_all(connection)
            if version is None:
                connection.execute(sa.insert(schema_version_table).values(version=SCHEMA_VERSION))


class StateTransaction:
    """The writes of one `MonitorState.transaction()`; they commit together or not at all."""

    def __init__(self, state: MonitorState, connection: Connection, now: float) -> None:
        self._state = state
        self._connection = connection
        self.now = now

    def save_cursor(self, cursor: Cursor) -> None:
        """Store the run's cursor (its metric steps replace the stored ones)."""
        if not isinstance(cursor, Cursor) or not cursor.run_id:
            raise InputError(f"cursor must be a Cursor with a run_id, got {cursor!r}.")
        values = {"last_step": cursor.last_step, "last_check_at": cursor.last_check_at,
                  "check_interval": cursor.check_interval, "polled_at": cursor.polled_at}
        upsert(self._connection, cursors_table, {"run_id": cursor.run_id}, values)
        self._connection.execute(
            sa.delete(cursor_metrics_table).where(cursor_metrics_table.c.run_id == cursor.run_id)
        )
        if cursor.metric_steps:
            self._connection.execute(sa.insert(cursor_metrics_table), [
                {"run_id": cursor.run_id, "metric_key": key, "last_step": int(step)}
                for key, step in cursor.metric_steps.items()
            ])

    def save_alert(
        self, run_id: str, rule: str, state: AlertState, *, transition: Transition | None = None
    ) -> None:
        """Store one alert's state; `transition` (if any) becomes its last transition."""
        if not isinstance(state, AlertState):
            raise InputError(
                f"state must be an AlertState (from gradwatch.alerts.state.advance), got "
                f"{type(state).__name__}."
            )
        _check_name("rule", rule)
        values: dict[str, Any] = {**state.model_dump(), "updated_at": self.now}
        if transition is not None:
            values.update(last_transition=transition.kind,
                          last_transition_step=transition.step, last_transition_at=self.now)
        upsert(self._connection, alerts_table, {"run_id": run_id, "rule": rule}, values)

    def enqueue(self, notification_id: str, channel: str, payload: str) -> bool:
        """Add a (notification, channel) row due now; False if that pair is already there."""
        _check_name("notification_id", notification_id, limit=64)
        _check_channel(channel)
        try:
            json.loads(payload)
        except (TypeError, ValueError) as error:
            raise InputError(
                f"payload must be a JSON text (Notification.to_json().decode()), got "
                f"{type(payload).__name__} that does not parse: {error}."
            ) from None
        existing = self._connection.execute(
            sa.select(outbox_table.c.id).where(
                outbox_table.c.notification_id == notification_id, outbox_table.c.channel == channel
            )
        ).first()
        if existing is not None:
            return False
        self._connection.execute(sa.insert(outbox_table).values(
            notification_id=notification_id, channel=channel, payload=payload,
            status="pending", attempts=0, created_at=self.now, next_attempt_at=self.now,
        ))
        return True


# -- helpers ----------------------------------------------------------------------------------


def _validate_backoff(base: float, factor: float, cap: float, max_attempts: int) -> None:
    def finite(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
            value
        )

    if not (finite(base) and base > 0):
        raise ConfigError(f"backoff_base must be finite seconds > 0 (default 5), got {base!r}.")
    if not (finite(factor) and factor >= 1):
        raise ConfigError(f"backoff_factor must be finite and ≥ 1 (default 2), got {factor!r}.")
    if not (finite(cap) and cap >= base):
        raise ConfigError(
            f"backoff_cap must be finite and ≥ backoff_base={base!r} (default 900), got {cap!r}."
        )
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ConfigError(f"max_attempts must be an int ≥ 1 (default 12), got {max_attempts!r}.")


def _positive_seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        0 < value < math.inf
    ):
        raise ConfigError(f"{name} must be a finite number of seconds > 0, got {value!r}.")
    return float(value)


def _check_name(name: str, value: object, *, limit: int = NAME_LIMIT) -> None:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise InputError(f"{name} must be a non-empty str of at most {limit} characters, "
                         f"got {value!r}.")


def _check_channel(channel: object) -> None:
    _check_name("channel", channel)
    assert isinstance(channel, str)
    if "://" in channel:
        raise InputError(
            "channel must be the name of a channel in the monitor's config (e.g. 'ops-slack'), "
            "not its URL: URLs carry secrets, and the state database must not hold them."
        )


def _check_status(status: object) -> OutboxStatus:
    if status not in ("pending", "sent", "dead"):
        raise InputError(f"status must be 'pending', 'sent' or 'dead', got {status!r}.")
    return cast(OutboxStatus, status)


def _error_text(error: str | BaseException) -> str:
    """A secret-free, bounded account of a delivery error."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    text = scrub_urls(text)
    return text if len(text) <= ERROR_LIMIT else text[: ERROR_LIMIT - 1] + "…"


def _get_outbox(connection: Connection, outbox_id: int) -> OutboxRow:
    row = connection.execute(
        sa.select(outbox_table).where(outbox_table.c.id == outbox_id)).one_or_none()
    if row is None:
        raise InputError(
            f"No outbox row with id {outbox_id!r}; use the id of a row from due() or outbox()."
        )
    return outbox_from_row(row)
