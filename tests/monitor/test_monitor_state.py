"""The monitor's state store: an outbox that writes before sending and never duplicates a
transition, alert states saved atomically with their notifications, silences that expire, a
lock against a second monitor, and everything kept across a restart — on real SQLite files and
on a real PostgreSQL server (every test taking `state` or `state_url` runs on both)."""

from __future__ import annotations

import fcntl
import json
import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy
import sqlalchemy.exc

from gradwatch import ConfigError, GradwatchError, InputError
from gradwatch.alerts.notify import Notification
from gradwatch.alerts.state import AlertPolicy, AlertState, advance
from gradwatch.common.errors import DeliveryError
from gradwatch.monitor import lease
from gradwatch.monitor.schema import SCHEMA_VERSION
from gradwatch.monitor.state import MonitorLockedError, MonitorState
from gradwatch.monitor.stored import OutboxEntry, SilenceMatcher
from gradwatch.record.reader import Cursor
from tests.support.postgres import PostgresServer

T0 = 1_700_000_000.0  # a fixed "now" for the manual clock


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "monitor.db"


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest, db_path: Path) -> str:
    """A new, empty state: a SQLite file, or a database of the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{db_path}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.new_database()


def _lock(url: str) -> bool:
    return url.startswith("sqlite")  # the file lock; PostgreSQL's lease is separate


@pytest.fixture
def state(state_url: str, clock: ManualClock) -> Iterator[MonitorState]:
    with MonitorState(state_url, clock=clock, backoff_base=10, backoff_factor=2,
                      backoff_cap=60, max_attempts=4, lock=_lock(state_url)) as opened:
        yield opened


def _payload(notification_id: str) -> str:
    notification = Notification(id=notification_id, kind="firing", title="gradwatch ALERT")
    return notification.to_json().decode()


def _firing_state(step: int) -> tuple[AlertState, OutboxEntry]:
    new_state, transition = advance(AlertPolicy(), AlertState(), True, step=step, key="run-1")
    assert transition is not None
    notification = Notification.from_transition(transition, title="ALERT", run_id="run-1")
    [entry] = OutboxEntry.for_channels(notification, ["ops"])
    return new_state, entry


# -- the outbox -------------------------------------------------------------------------------


def test_enqueue_is_idempotent_per_notification_and_channel(state: MonitorState) -> None:
    assert state.enqueue("n-1", "ops", _payload("n-1")) is True
    assert state.enqueue("n-1", "ops", _payload("n-1")) is False  # a replayed transition
    assert state.enqueue("n-1", "team", _payload("n-1")) is True  # another channel: its own row
    assert [(r.notification_id, r.channel) for r in state.outbox()] == [
        ("n-1", "ops"), ("n-1", "team")
    ]
    [first, _] = state.outbox()
    state.mark_sent(first.id)
    assert state.enqueue("n-1", "ops", _payload("n-1")) is False  # sent rows still count
    assert state.pending_count() == 1


def test_a_replayed_transition_adds_no_row(state: MonitorState) -> None:
    new_state, entry = _firing_state(300)
    assert state.record_transition("run-1", "distance", new_state, notifications=[entry]) == 1
    # A restart re-read the same checks: same transition, same id, nothing new.
    assert state.record_transition("run-1", "distance", new_state, notifications=[entry]) == 0
    assert len(state.outbox()) == 1


def test_due_mark_sent_and_backoff_follow_the_clock(
    state: MonitorState, clock: ManualClock
) -> None:
    state.enqueue("n-1", "ops", _payload("n-1"))
    [row] = state.due()
    assert (row.status, row.attempts, row.next_attempt_at) == ("pending", 0, T0)
    assert state.due(T0 - 1) == []  # not due before it was written

    # Failure n waits min(cap, base·factorⁿ⁻¹) = 10, 20, 40 seconds.
    for attempt, delay in ((1, 10.0), (2, 20.0), (3, 40.0)):
        failed = state.mark_failed(row.id, DeliveryError("HTTP 503"), now=clock())
        assert (failed.status, failed.attempts) == ("pending", attempt)
        assert failed.next_attempt_at == clock() + delay
        assert failed.last_error == "DeliveryError: HTTP 503"
        clock.advance(delay - 0.5)
        assert state.due() == []
        clock.advance(0.5)
        assert [r.id for r in state.due()] == [row.id]

    sent = state.mark_sent(row.id)
    assert (sent.status, sent.sent_at, sent.attempts) == ("sent", clock(), 3)
    assert state.due(clock() + 10_000) == [] and state.pending_count() == 0


def test_backoff_honours_retry_after_up_to_the_cap(state: MonitorState) -> None:
    state.enqueue("n-1", "ops", _payload("n-1"))
    [row] = state.due()
    assert state.mark_failed(row.id, "429", now=T0, retry_after=30).next_attempt_at == T0 + 30
    assert state.mark_failed(row.id, "429", now=T0, retry_after=1e9).next_attempt_at == T0 + 60


def test_a_row_dies_after_max_attempts_and_is_kept(
    state: MonitorState, clock: ManualClock
) -> None:
    state.enqueue("n-1", "ops", _payload("n-1"))
    [row] = state.due()
    for _ in range(4):
        failed = state.mark_failed(row.id, f"ConnectionRefusedError at {clock()}")
        clock.advance(60)
    assert (failed.status, failed.attempts) == ("dead", 4)
    assert failed.last_error == f"ConnectionRefusedError at {clock() - 60}"
    assert state.due(clock() + 10_000) == [] and state.pending_count() == 0
    assert [r.id for r in state.outbox("dead")] == [row.id]
    # A late report about an older attempt changes nothing; requeue gives it a new life.
    assert state.mark_failed(row.id, "late").attempts == 4
    requeued = state.requeue(row.id)
    assert (requeued.status, requeued.attempts, requeued.last_error) == (
        "pending", 0, failed.last_error
    )
    assert [r.id for r in state.due()] == [row.id]


def test_a_permanent_failure_dies_at_once_and_errors_keep_no_secret(
    state: MonitorState,
) -> None:
    state.enqueue("n-1", "ops", _payload("n-1"))
    [row] = state.due()
    error = DeliveryError("HTTP 404 from https://hooks.example.com/T00/B00/secret-token",
                          retryable=False)
    dead = state.mark_failed(row.id, error, retryable=error.retryable)
    assert dead.status == "dead" and dead.attempts == 1
    assert dead.last_error is not None and "secret-token" not in dead.last_error
    assert "https://hooks.example.com/***" in dead.last_error


def test_bad_outbox_input_is_refused(state: MonitorState) -> None:
    with pytest.raises(InputError, match="not its URL"):
        state.enqueue("n-1", "slack://TokenA/TokenB", _payload("n-1"))
    with pytest.raises(InputError, match="JSON text"):
        state.enqueue("n-1", "ops", "{not json")
    with pytest.raises(InputError, match="No outbox row with id 99"):
        state.mark_sent(99)
    assert state.outbox() == []


# -- atomicity --------------------------------------------------------------------------------


def test_a_failed_transition_leaves_no_state_and_no_notification(db_path: Path) -> None:
    with MonitorState(db_path, clock=ManualClock()) as state:
        pass
    # A real failure inside the database, as a full disk would give: this insert aborts.
    with sqlite3.connect(db_path) as raw:
        raw.execute(
            "CREATE TRIGGER refuse_boom BEFORE INSERT ON gradwatch_outbox "
            "WHEN NEW.notification_id = 'boom' BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )
    raw.close()
    new_state, entry = _firing_state(300)
    with MonitorState(db_path, clock=ManualClock()) as state:
        with pytest.raises(sqlalchemy.exc.IntegrityError, match="disk full"):
            state.record_transition(
                "run-1", "distance", new_state,
                notifications=[entry, entry._replace(notification_id="boom")],
                cursor=Cursor("run-1", last_step=300),
            )
        assert state.alert("run-1", "distance") is None
        assert state.outbox() == [] and state.cursor("run-1") is None

        # The same, failing in Python half-way through a transaction.
        with pytest.raises(InputError), state.transaction() as tx:
            tx.save_alert("run-1", "distance", new_state)
            tx.enqueue(*entry)
            tx.enqueue(entry.notification_id, "team", "{torn")
        assert state.alert("run-1", "distance") is None and state.outbox() == []

        # And it all lands together once nothing fails.
        assert state.record_transition("run-1", "distance", new_state, notifications=[entry],
                                       cursor=Cursor("run-1", last_step=300)) == 1
        stored = state.alert("run-1", "distance")
        assert stored is not None and stored.state == new_state
        assert len(state.outbox()) == 1 and state.cursor("run-1") is not None


# -- restart ----------------------------------------------------------------------------------


def test_a_restart_keeps_cursors_states_outbox_and_silences(
    state_url: str, clock: ManualClock
) -> None:
    new_state, entry = _firing_state(300)
    _, transition = advance(AlertPolicy(), AlertState(), True, step=300, key="run-1")
    cursor = Cursor("run-1", last_step=300, metric_steps={"gradwatch/rel_distance": 300},
                    last_check_at=T0 - 5, polled_at=T0)
    with MonitorState(state_url, clock=clock, lock=_lock(state_url)) as state:
        state.record_transition("run-1", "distance", new_state, transition=transition,
                                notifications=[entry], cursor=cursor)
        state.enqueue("n-2", "ops", _payload("n-2"))
        state.mark_failed(state.due()[1].id, "HTTP 502")
        silence_id = state.add_silence(SilenceMatcher(rule="stale"), duration=3600,
                                       comment="maintenance")
        before = (state.cursors(), state.alerts(), state.outbox(), state.silences())

    with MonitorState(state_url, clock=clock, lock=_lock(state_url)) as state:
        assert (state.cursors(), state.alerts(), state.outbox(), state.silences()) == before
        assert state.cursor("run-1") == cursor
        stored = state.alert("run-1", "distance")
        assert stored is not None
        assert (stored.state.state, stored.last_transition, stored.last_transition_step) == (
            "firing", "firing", 300
        )
        assert state.is_silenced("run-2", None, "stale") and before[3][0].id == silence_id
        # The row written but never marked sent is still due: at least once, not lost.
        assert [r.notification_id for r in state.due()] == [entry.notification_id]
        assert state.enqueue(*entry) is False


def test_a_cursor_replaces_its_metric_steps(state: MonitorState) -> None:
    state.save_cursor(Cursor("run-1", metric_steps={"a": 1, "b": 2}))
    state.save_cursor(Cursor("run-1", last_step=5, metric_steps={"a": 5}))
    assert state.cursor("run-1") == Cursor("run-1", last_step=5, metric_steps={"a": 5})
    assert state.cursor("run-2") is None


# -- the lock ---------------------------------------------------------------------------------


def test_the_lock_refuses_a_second_monitor_until_closed(db_path: Path) -> None:
    first = MonitorState(db_path)
    with pytest.raises(MonitorLockedError, match="another MonitorState in this process") as info:
        MonitorState(db_path)
    assert isinstance(info.value, GradwatchError) and "lock=False" in str(info.value)
    with MonitorState(db_path, lock=False) as reader:  # a status command may still read it
        assert reader.pending_count() == 0
    first.close()
    first.close()  # idempotent
    MonitorState(db_path).close()


def test_lock_needs_a_file_and_a_closed_state_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="lock=True needs a SQLite file"):
        MonitorState("sqlite://")
    with MonitorState("sqlite://", lock=False) as memory:
        assert memory.enqueue("n-1", "ops", "{}") is True
    with pytest.raises(GradwatchError, match="is closed"):
        memory.pending_count()


# -- silences ---------------------------------------------------------------------------------


def test_silences_match_globs_and_expire(state: MonitorState, clock: ManualClock) -> None:
    by_run = state.add_silence(SilenceMatcher(run_id="run-1"), duration=timedelta(hours=1))
    by_experiment = state.add_silence(SilenceMatcher(experiment="llm-*", rule="stale"),
                                      expires_at=T0 + 60, comment="nightly restart")
    assert state.is_silenced("run-1", "vision", "distance")
    assert state.is_silenced("run-9", ["12", "llm-7b"], "stale")  # name or id may match
    assert not state.is_silenced("run-9", ["12", "llm-7b"], "distance")
    assert not state.is_silenced("run-9", None, "stale")

    clock.advance(60)  # expires_at is exclusive
    assert [s.id for s in state.silences()] == [by_run]
    assert not state.is_silenced("run-9", "llm-7b", "stale")
    expired = state.expire_silence(by_run)
    assert expired.expires_at == clock() and not state.is_silenced("run-1", None, "distance")
    assert state.silences() == []
    assert [s.id for s in state.silences(active_only=False)] == [by_run, by_experiment]
    assert state.silences(active_only=False)[1].comment == "nightly restart"


def test_bad_silences_are_refused(state: MonitorState) -> None:
    with pytest.raises(ConfigError, match="exactly one of duration"):
        state.add_silence(SilenceMatcher(rule="stale"))
    with pytest.raises(ConfigError, match="after now"):
        state.add_silence(SilenceMatcher(rule="stale"), expires_at=T0 - 1)
    with pytest.raises(ConfigError, match="duration must be"):
        state.add_silence(SilenceMatcher(rule="stale"), duration=-5)
    with pytest.raises(ConfigError, match="non-empty glob"):
        SilenceMatcher(rule="")
    with pytest.raises(InputError, match="No silence with id 7"):
        state.expire_silence(7)


# -- schema -----------------------------------------------------------------------------------


def test_a_newer_schema_is_refused(db_path: Path) -> None:
    MonitorState(db_path).close()
    with sqlite3.connect(db_path) as raw:
        raw.execute("INSERT INTO gradwatch_schema_version (version) VALUES (?)",
                    (SCHEMA_VERSION + 1,))
    raw.close()
    with pytest.raises(ConfigError, match=f"schema version {SCHEMA_VERSION + 1}, written by "
                                          f"a newer gradwatch"):
        MonitorState(db_path)
    # The failed open released its lock: another process could take it now.
    with open(db_path.with_name(db_path.name + ".lock"), "rb") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    mlflow_db = tmp_path / "mlflow.db"
    with sqlite3.connect(mlflow_db) as raw:
        raw.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY)")
    raw.close()
    with pytest.raises(ConfigError, match=r"other tables \(experiments, ...\).*MLflow database"):
        MonitorState(mlflow_db)
    with sqlite3.connect(mlflow_db) as raw:
        tables = {name for (name,) in raw.execute("SELECT name FROM sqlite_master")}
    raw.close()
    assert tables == {"experiments"}  # nothing was added to it


def test_payloads_round_trip(state: MonitorState) -> None:
    _, entry = _firing_state(300)
    state.enqueue(*entry)
    [row] = state.due()
    assert Notification.model_validate(json.loads(row.payload)).id == entry.notification_id


def test_a_version_1_state_is_upgraded_in_place_and_keeps_its_rows(
    state_url: str, clock: ManualClock
) -> None:
    """A state written by the previous gradwatch (schema 1: no lease, no replicas, no claim
    columns), reproduced from this one by removing what version 2 added."""
    with MonitorState(state_url, clock=clock, lock=_lock(state_url)) as state:
        state.enqueue("n-1", "ops", _payload("n-1"))
    engine = sqlalchemy.create_engine(state_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE gradwatch_lease")
        connection.exec_driver_sql("DROP TABLE gradwatch_replicas")
        connection.exec_driver_sql("ALTER TABLE gradwatch_outbox DROP COLUMN claimed_by")
        connection.exec_driver_sql("ALTER TABLE gradwatch_outbox DROP COLUMN claimed_at")
        connection.exec_driver_sql("UPDATE gradwatch_schema_version SET version = 1")
    with MonitorState(state_url, clock=clock, lock=_lock(state_url)) as state:
        assert [row.notification_id for row in state.due()] == ["n-1"]
        assert state.lease() is None and state.replicas() == []
    with engine.begin() as connection:
        version = connection.exec_driver_sql(
            "SELECT MAX(version) FROM gradwatch_schema_version").scalar_one()
        columns = {c["name"] for c in sqlalchemy.inspect(connection).get_columns(
            "gradwatch_outbox")}
    engine.dispose()
    assert version == SCHEMA_VERSION == 2
    assert {"claimed_by", "claimed_at"} <= columns


# -- the lease: one active monitor among replicas ---------------------------------------------


@pytest.fixture
def shared(state_url: str, clock: ManualClock) -> Iterator[MonitorState]:
    """The state as replicas share it: no file lock (with SQLite's lock a process is alone and
    takes the lease at once, `test_with_the_file_lock_a_killed_holders_lease_is_taken`)."""
    with MonitorState(state_url, clock=clock, lock=False) as opened:
        yield opened


def test_one_replica_holds_the_lease_and_a_standby_takes_over_when_it_lapses(
    shared: MonitorState, clock: ManualClock
) -> None:
    state = shared
    ttl = 15.0
    assert lease.acquire(state, "a-1-x", ttl, started_at=T0) is True
    assert lease.acquire(state, "b-2-y", ttl, started_at=T0) is False  # a standby
    assert [(r.replica_id, r.role) for r in state.replicas()] == [
        ("a-1-x", "active"), ("b-2-y", "standby")]
    clock.advance(10)
    assert lease.acquire(state, "a-1-x", ttl, started_at=T0) is True  # renewed
    held = state.lease()
    assert held is not None and (held.holder, held.acquired_at, held.expires_at) == (
        "a-1-x", T0, T0 + 10 + ttl)
    clock.advance(ttl - 1)
    assert lease.acquire(state, "b-2-y", ttl, started_at=T0) is False  # not lapsed yet
    clock.advance(1)  # a-1-x was killed after its last renewal: the lease lapses
    assert lease.acquire(state, "b-2-y", ttl, started_at=T0) is True
    held = state.lease()
    assert held is not None and (held.holder, held.acquired_at) == ("b-2-y", clock.now)
    assert lease.acquire(state, "a-1-x", ttl, started_at=T0) is False  # back as a standby


def test_only_the_lease_holder_claims_and_a_takeover_reclaims_unsent_rows(
    shared: MonitorState, clock: ManualClock
) -> None:
    state = shared
    ttl = 15.0
    state.enqueue("n-1", "ops", _payload("n-1"))
    assert lease.claim_due(state, "a-1-x") == []  # no lease, no claim
    lease.acquire(state, "a-1-x", ttl, started_at=T0)
    lease.acquire(state, "b-2-y", ttl, started_at=T0)
    assert lease.claim_due(state, "b-2-y") == []  # the standby claims nothing
    [claimed] = lease.claim_due(state, "a-1-x")
    assert claimed.notification_id == "n-1"
    # a-1-x is killed between "claimed" and "sent"; once its lease lapses it is fenced off
    clock.advance(ttl)
    assert lease.claim_due(state, "a-1-x") == []
    assert lease.acquire(state, "b-2-y", ttl, started_at=T0)
    [again] = lease.claim_due(state, "b-2-y")  # the same row, sent once by the new holder
    assert again.id == claimed.id
    state.mark_sent(again.id)
    assert lease.claim_due(state, "b-2-y") == []


def test_a_released_lease_is_taken_at_once(state: MonitorState) -> None:
    assert lease.acquire(state, "a-1-x", 60.0, started_at=T0)
    lease.release(state, "a-1-x")
    assert [r.replica_id for r in state.replicas()] == []
    assert lease.acquire(state, "b-2-y", 60.0, started_at=T0)


def test_with_the_file_lock_a_killed_holders_lease_is_taken(
    db_path: Path, clock: ManualClock
) -> None:
    with MonitorState(db_path, clock=clock, lock=False) as other:
        assert lease.acquire(other, "killed-1-x", 60.0, started_at=T0)  # then SIGKILL
    with MonitorState(db_path, clock=clock) as alone:  # the lock proves no one else runs
        assert alone.exclusive and lease.acquire(alone, "next-2-y", 60.0, started_at=T0)
