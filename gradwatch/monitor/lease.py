"""One active monitor among replicas: a lease row in the state, renewed by its holder.

Any number of `gradwatch monitor` processes may run on one state; exactly one polls and
sends. The choice is a row in `gradwatch_lease` (name "monitor"): its holder, when it was
taken and when it expires. Why a lease row with an expiry, not a PostgreSQL advisory lock
held on a session: a session lock is released only when the server notices the session is
gone — at once for a killed process, but only after TCP keepalive (minutes to hours by
default) for a host that vanished or a network cut, and the old holder keeps believing it is
active meanwhile. A lease expires on the clock whatever happened to its holder, works the
same on SQLite and PostgreSQL, and is a row that `status` can show.

    every replica, every `renew_every` seconds (a thread of its own, so a long poll does not
    let the lease lapse):
        heartbeat (gradwatch_replicas)
        UPDATE gradwatch_lease SET holder = me, expires_at = now + ttl
            WHERE name = 'monitor' AND (holder = me OR expires_at <= now)   -- atomic
        (or INSERT it when there is none; a concurrent INSERT loses on the primary key)

    rowcount 1 → active; 0 → standby.

The active replica sends only what it has claimed, in one transaction that also checks it
still holds the lease (`claim_due`): rows claimed by a replica that lost the lease are claimed
again by the new holder (a replica killed between "claimed" and "sent" → sent once by the
next), and a paused replica that wakes after its lease expired claims nothing. The one
duplicate left is the documented at-least-once case: killed between "sent" and "marked sent",
the next holder sends it again with the same notification id.

Timing: with `ttl = 1.25 × poll_interval` and `renew_every = poll_interval / 4` (the
monitor's), a killed active replica's lease expires at most ttl after its last renewal, and a
standby looks every renew_every: it takes over within 1.5 poll intervals of the kill (the
required bound is 2), while an active replica may miss 4 renewals in a row before it lapses.
Replicas compare their own clocks with the stored times, so hosts must keep their clocks in
sync (NTP): a skew of s seconds moves the takeover by s.

Imports: monitor.schema, monitor.stored (sqlalchemy).
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from gradwatch.monitor.schema import lease_table, outbox_table, replicas_table, upsert
from gradwatch.monitor.stored import OutboxRow, outbox_from_row

if TYPE_CHECKING:
    from gradwatch.monitor.state import MonitorState

__all__ = ["LEASE", "Lease", "Replica", "new_replica_id"]

#: The lease's row name.
LEASE = "monitor"


@dataclass(frozen=True)
class Lease:
    holder: str
    acquired_at: float
    renewed_at: float
    expires_at: float


@dataclass(frozen=True)
class Replica:
    replica_id: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    role: str  # "active" or "standby"


def new_replica_id() -> str:
    """host-pid-random: unique per process, readable in `status`."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def acquire(state: MonitorState, replica_id: str, ttl: float, *, started_at: float,
            now: float | None = None) -> bool:
    """Renew or take the lease for `replica_id` (True: active until now + ttl) and record the
    replica's heartbeat with the role that came out, in one transaction. A state opened with
    SQLite's file lock (`MonitorState.exclusive`) is this process's alone: a lease still held
    by a replica killed a moment ago is taken at once."""
    moment = state._now(now)
    takeable = sa.or_(lease_table.c.holder == replica_id, lease_table.c.expires_at <= moment)
    with state._connection_begin() as connection:
        taken = connection.execute(
            sa.update(lease_table)
            .where(lease_table.c.name == LEASE, sa.true() if state.exclusive else takeable)
            .values(holder=replica_id, renewed_at=moment, expires_at=moment + ttl,
                    acquired_at=sa.case((lease_table.c.holder == replica_id,
                                         lease_table.c.acquired_at), else_=moment))
        ).rowcount == 1
        if not taken and connection.execute(
                sa.select(sa.func.count()).select_from(lease_table)
                .where(lease_table.c.name == LEASE)).scalar_one() == 0:
            try:
                with connection.begin_nested():
                    connection.execute(sa.insert(lease_table).values(
                        name=LEASE, holder=replica_id, acquired_at=moment, renewed_at=moment,
                        expires_at=moment + ttl))
                taken = True
            except sa.exc.IntegrityError:  # another replica inserted it first
                taken = False
        upsert(connection, replicas_table, {"replica_id": replica_id}, {
            "host": replica_id.rsplit("-", 2)[0], "pid": os.getpid(), "started_at": started_at,
            "heartbeat_at": moment, "role": "active" if taken else "standby"})
    return taken


def release(state: MonitorState, replica_id: str, *, now: float | None = None) -> None:
    """A clean stop: the lease expires now (a standby takes over at its next look) and the
    replica's row goes."""
    moment = state._now(now)
    with state._connection_begin() as connection:
        connection.execute(sa.update(lease_table).where(
            lease_table.c.name == LEASE, lease_table.c.holder == replica_id).values(
            expires_at=moment))
        connection.execute(sa.delete(replicas_table).where(
            replicas_table.c.replica_id == replica_id))


def current(state: MonitorState) -> Lease | None:
    with state._connection_begin() as connection:
        row = connection.execute(
            sa.select(lease_table).where(lease_table.c.name == LEASE)).first()
    return None if row is None else Lease(row.holder, row.acquired_at, row.renewed_at,
                                          row.expires_at)


def replicas(state: MonitorState) -> list[Replica]:
    with state._connection_begin() as connection:
        rows = connection.execute(sa.select(replicas_table).order_by(
            replicas_table.c.started_at, replicas_table.c.replica_id)).all()
    return [Replica(r.replica_id, r.host, r.pid, r.started_at, r.heartbeat_at, r.role)
            for r in rows]


def claim_due(state: MonitorState, replica_id: str, *, now: float | None = None,
              limit: int = 100) -> list[OutboxRow]:
    """The due rows this replica may send now, claimed for it — none unless it holds an
    unexpired lease (checked in the same transaction). On PostgreSQL the rows are locked
    with FOR UPDATE SKIP LOCKED, so two claimers never take the same row."""
    moment = state._now(now)
    with state._connection_begin() as connection:
        holds = connection.execute(sa.select(sa.func.count()).select_from(lease_table).where(
            lease_table.c.name == LEASE, lease_table.c.holder == replica_id,
            lease_table.c.expires_at > moment)).scalar_one()
        if not holds:
            return []
        query: Any = (
            sa.select(outbox_table.c.id)
            .where(outbox_table.c.status == "pending", outbox_table.c.next_attempt_at <= moment)
            .order_by(outbox_table.c.next_attempt_at, outbox_table.c.id).limit(limit))
        if connection.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        ids = [row.id for row in connection.execute(query)]
        if not ids:
            return []
        connection.execute(sa.update(outbox_table).where(outbox_table.c.id.in_(ids)).values(
            claimed_by=replica_id, claimed_at=moment))
        rows = connection.execute(sa.select(outbox_table).where(
            outbox_table.c.id.in_(ids)).order_by(outbox_table.c.next_attempt_at,
                                                 outbox_table.c.id)).all()
    return [outbox_from_row(row) for row in rows]
