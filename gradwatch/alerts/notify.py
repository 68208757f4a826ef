"""Notifications: what an alert says (`Notification`) and what it is sent through (`Notifier`).

Imports: gradwatch.common, gradwatch.alerts.state. The rest of the notification path builds on
this module:

- `Notification`: one announcement (firing, repeat, resolved) as a JSON-serialisable model.
  Its `id` comes from the alert's `Transition.id`, so it is the same on every retry and on a
  replay after a resume: receivers deduplicate on it.
- `Notifier`: anything with a redacted `name` and `send(notification)` that raises on failure.
- `gradwatch.alerts.redact`: URLs and error texts with their secrets replaced by ``***``, for
  names and logs.
- `gradwatch.alerts.channels`: the two notifiers that come with gradwatch (`JsonWebhook` for
  http(s) URLs, `AppriseNotifier` for every other scheme) and `make_notifier`, which picks one
  from a URL.
- `gradwatch.alerts.dispatch`: `Dispatcher`, delivery off the calling thread with retries.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from gradwatch.alerts.state import Transition, TransitionKind
from gradwatch.common.errors import InputError

__all__ = ["Notification", "Notifier", "Severity"]

Severity = Literal["info", "warning", "critical"]

#: Bumped when a field of the webhook payload changes meaning.
NOTIFICATION_SCHEMA_VERSION = 1


class Notification(BaseModel):
    """One alert announcement; `payload()` is what webhooks receive.

    Example:
        >>> from gradwatch.alerts.state import Transition
        >>> n = Notification.from_transition(
        ...     Transition(kind="firing", step=300, key="run-1"),
        ...     title="gradwatch ALERT at step 300", run_id="run-1", details={"verdict": "alert"})
        >>> n.severity, n.step, n.payload()["details"]
        ('critical', 300, {'verdict': 'alert'})
        >>> Notification.model_validate(n.payload()) == n
        True
    """

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="strings")

    schema_version: int = NOTIFICATION_SCHEMA_VERSION
    id: str = Field(min_length=1, description="stable id of the transition: deduplicate on it")
    kind: TransitionKind
    title: str
    body: str = Field(default="", description="plain text")
    severity: Severity = "warning"
    run_id: str | None = None
    step: int | None = None
    details: dict[str, JsonValue] = Field(
        default_factory=dict, description="free JSON (NaN and ±inf are sent as strings)"
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise InputError(
                f"Invalid Notification: {problems}. Expected id, kind ('firing', 'repeat' or "
                f"'resolved') and title, with JSON-able details; Notification.from_transition "
                f"fills id, kind and step for you."
            ) from None

    @classmethod
    def from_transition(
        cls,
        transition: Transition,
        *,
        title: str,
        body: str = "",
        severity: Severity | None = None,
        run_id: str | None = None,
        details: Mapping[str, JsonValue] | None = None,
    ) -> Notification:
        """The notification of `transition`; severity defaults to "info" for resolved, else
        "critical"."""
        if severity is None:
            severity = "info" if transition.kind == "resolved" else "critical"
        return cls(
            id=transition.id, kind=transition.kind, title=title, body=body, severity=severity,
            run_id=run_id, step=transition.step, details=dict(details or {}),
        )

    def to_json(self) -> bytes:
        """The webhook body: strict JSON, UTF-8."""
        return self.model_dump_json().encode()

    def payload(self) -> dict[str, Any]:
        """The webhook body as a dict (exactly what `to_json` encodes)."""
        result: dict[str, Any] = json.loads(self.to_json())
        return result


@runtime_checkable
class Notifier(Protocol):
    """Where notifications go. `name` is shown in logs, so it must hold no secret (use
    `redact`); `send` delivers one notification or raises (ideally `DeliveryError`)."""

    @property
    def name(self) -> str: ...

    def send(self, notification: Notification) -> None: ...
