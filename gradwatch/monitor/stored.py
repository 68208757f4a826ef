"""What the monitor's state stores and hands back: alerts, outbox rows and silences.

What the monitor's state stores and hands back (see `gradwatch.monitor.state` for how): a
stored alert, an outbox entry to write and an outbox row as stored, a silence and what it
mutes, and the conversions from the tables' rows to these values.

Imports: gradwatch.common, gradwatch.alerts, monitor.schema.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Literal, NamedTuple

import sqlalchemy as sa

from gradwatch.alerts.notify import Notification
from gradwatch.alerts.state import AlertState, TransitionKind
from gradwatch.common.errors import ConfigError
from gradwatch.monitor.schema import NAME_LIMIT

__all__ = [
    "OutboxEntry",
    "OutboxRow",
    "OutboxStatus",
    "Silence",
    "SilenceMatcher",
    "StoredAlert",
    "alert_from_row",
    "outbox_from_row",
    "silence_from_row",
]

OutboxStatus = Literal["pending", "sent", "dead"]

# -- values -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredAlert:
    """One (run, rule) alert as stored: its `AlertState` and the last transition announced."""

    run_id: str
    rule: str
    state: AlertState
    last_transition: TransitionKind | None
    last_transition_step: int | None
    last_transition_at: float | None
    updated_at: float


class OutboxEntry(NamedTuple):
    """A notification to write to the outbox for one channel.

    `channel` names a channel of the monitor's config (e.g. "ops-slack"), never its URL: URLs
    carry secrets and the database is not a place for them.
    """

    notification_id: str
    channel: str
    payload: str

    @classmethod
    def for_channels(
        cls, notification: Notification, channels: Iterable[str]
    ) -> list[OutboxEntry]:
        """One entry per channel, all carrying `notification`'s id and webhook payload.

        Example:
            >>> n = Notification(id="abc", kind="firing", title="gradwatch ALERT")
            >>> [(e.notification_id, e.channel) for e in OutboxEntry.for_channels(n, ["a", "b"])]
            [('abc', 'a'), ('abc', 'b')]
        """
        payload = notification.to_json().decode()
        return [cls(notification.id, channel, payload) for channel in channels]


@dataclass(frozen=True)
class OutboxRow:
    """One stored (notification, channel) delivery and where it stands."""

    id: int
    notification_id: str
    channel: str
    payload: str
    status: OutboxStatus
    attempts: int
    created_at: float
    next_attempt_at: float
    last_attempt_at: float | None
    sent_at: float | None
    last_error: str | None


@dataclass(frozen=True)
class SilenceMatcher:
    """What a silence mutes: fnmatch globs (case-sensitive) on the run id, the experiment (name
    or id) and the rule; None matches anything. `SilenceMatcher()` mutes everything.

    Example:
        >>> matcher = SilenceMatcher(experiment="llm-*", rule="stale")
        >>> matcher.matches("r1", ["llm-7b", "12"], "stale")
        True
        >>> SilenceMatcher(run_id="r2").matches("r1", ["llm-7b"], "stale")
        False
    """

    run_id: str | None = None
    experiment: str | None = None
    rule: str | None = None

    def __post_init__(self) -> None:
        for name in ("run_id", "experiment", "rule"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value
                                      or len(value) > NAME_LIMIT):
                raise ConfigError(
                    f"SilenceMatcher.{name} must be None (any) or a non-empty glob of at most "
                    f"{NAME_LIMIT} characters, e.g. 'llm-*', got {value!r}."
                )

    def matches(self, run_id: str, experiments: Iterable[str], rule: str) -> bool:
        """Whether a (run, experiment names/ids, rule) alert falls under this matcher."""
        if self.run_id is not None and not fnmatchcase(run_id, self.run_id):
            return False
        if self.rule is not None and not fnmatchcase(rule, self.rule):
            return False
        pattern = self.experiment
        return pattern is None or any(fnmatchcase(e, pattern) for e in experiments)


@dataclass(frozen=True)
class Silence:
    """A stored silence: active while `created_at` ≤ now < `expires_at`."""

    id: int
    matcher: SilenceMatcher
    created_at: float
    expires_at: float
    comment: str

    def active(self, now: float) -> bool:
        return self.created_at <= now < self.expires_at


# -- from the tables' rows --------------------------------------------------------------------


def outbox_from_row(row: sa.Row[Any]) -> OutboxRow:
    return OutboxRow(
        id=row.id, notification_id=row.notification_id, channel=row.channel,
        payload=row.payload, status=row.status, attempts=row.attempts,
        created_at=row.created_at, next_attempt_at=row.next_attempt_at,
        last_attempt_at=row.last_attempt_at, sent_at=row.sent_at, last_error=row.last_error,
    )


def alert_from_row(row: sa.Row[Any]) -> StoredAlert:
    state = AlertState(**{name: getattr(row, name) for name in AlertState.model_fields})
    return StoredAlert(
        run_id=row.run_id, rule=row.rule, state=state, last_transition=row.last_transition,
        last_transition_step=row.last_transition_step,
        last_transition_at=row.last_transition_at, updated_at=row.updated_at,
    )


def silence_from_row(row: sa.Row[Any]) -> Silence:
    return Silence(
        id=row.id,
        matcher=SilenceMatcher(run_id=row.run_id, experiment=row.experiment, rule=row.rule),
        created_at=row.created_at, expires_at=row.expires_at, comment=row.comment,
    )
