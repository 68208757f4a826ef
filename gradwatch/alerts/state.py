"""When an alerting check becomes an alert: pending → firing → resolved, counted in checks.

This is the Alertmanager/Grafana model, with one change: the durations are counted in *checks*
rather than in time, because gradient checks are sparse (every few hundred steps) and their
spacing changes with the schedule. The training callback and the monitor share it, so an alert
means the same thing in both::

               alerting (streak < fire_after)
    inactive ─────────────────────────────────▶ pending
       ▲  ▲                                       │ alerting, streak reaches fire_after
       │  └──── not alerting (no transition) ─────┤
       │                                          ▼
       └──── resolve_after non-alerting ────── firing ──▶ "repeat" every repeat_every
             checks in a row: "resolved"                  further alerting checks

With ``fire_after=1`` (the default) the first alerting check fires at once, without pending.
Only three things are announced, as a `Transition`: "firing", "repeat" and "resolved". Pending
is silent, as in Alertmanager.

Each transition has a stable `Transition.id`: sha256 of (key, kind, step). A receiver that
sees an id twice (a retried delivery, or a run resumed from a checkpoint that replays steps)
can drop the duplicate. Give each tracker a `key` that is unique to what it watches, e.g. the
MLflow run id: two trackers with the same key alerting at the same step share ids.

Imports: gradwatch.common only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gradwatch.common.errors import ConfigError, InputError

__all__ = [
    "AlertPolicy",
    "AlertState",
    "AlertTracker",
    "StateName",
    "Transition",
    "TransitionKind",
    "advance",
    "transition_id",
]

StateName = Literal["inactive", "pending", "firing"]
TransitionKind = Literal["firing", "repeat", "resolved"]

#: Bumped when the meaning of a field of `AlertTracker.state_dict` changes.
STATE_VERSION = 1

_POLICY_EXAMPLE = "e.g. AlertPolicy(fire_after=2, resolve_after=3, repeat_every=10)"


class AlertPolicy(BaseModel):
    """How many checks make an alert fire, repeat and resolve.

    Example:
        >>> AlertPolicy(fire_after=2, resolve_after=3)
        AlertPolicy(fire_after=2, resolve_after=3, repeat_every=None)
        >>> AlertPolicy(fire_after=0)
        Traceback (most recent call last):
        ...
        gradwatch.ConfigError: Invalid AlertPolicy: fire_after: ...
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    fire_after: int = Field(
        default=1, ge=1, strict=True,
        description="consecutive alerting checks before the alert fires",
    )
    resolve_after: int = Field(
        default=1, ge=1, strict=True,
        description="consecutive non-alerting checks before a firing alert resolves",
    )
    repeat_every: int | None = Field(
        default=None, ge=1, strict=True,
        description="while firing, notify again every N further alerting checks (None: never)",
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:  # one exception tree: a bad setting is a ConfigError
            raise ConfigError(_describe_policy_errors(exc)) from None


def _describe_policy_errors(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"]) or "AlertPolicy"
        if error["type"] == "extra_forbidden":
            valid = ", ".join(AlertPolicy.model_fields)
            problems.append(f"{name}: not a setting (valid settings: {valid})")
        else:
            problems.append(f"{name}: {error['msg']}, got {error.get('input')!r}")
    return (
        f"Invalid AlertPolicy: {'; '.join(problems)}. Counts are whole numbers of checks ≥ 1, "
        f"repeat_every may be None; {_POLICY_EXAMPLE}."
    )


class AlertState(BaseModel):
    """Where one alert stands; JSON round-trippable, so it can live in a checkpoint or a DB.

    Example:
        >>> state = AlertState(state="firing", alerting_streak=2, fired_at_step=300)
        >>> AlertState.model_validate_json(state.model_dump_json()) == state
        True
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    state: StateName = "inactive"
    alerting_streak: int = Field(
        default=0, ge=0, description="consecutive alerting checks in this episode"
    )
    clear_streak: int = Field(
        default=0, ge=0, description="consecutive non-alerting checks while firing"
    )
    since_notified: int = Field(
        default=0, ge=0, description="alerting checks since the last firing/repeat notice"
    )
    active_since_step: int | None = Field(
        default=None, description="step of the first alerting check of this episode"
    )
    fired_at_step: int | None = Field(
        default=None, description="step at which the current (or last) episode fired"
    )
    last_notified_step: int | None = Field(
        default=None, description="step of the last transition announced"
    )
    ever_fired: bool = False


@dataclass(frozen=True)
class Transition:
    """A change worth announcing: the alert fired, is still firing (repeat), or resolved.

    Example:
        >>> t = Transition(kind="firing", step=300, key="run-1", fired_at_step=300)
        >>> t.id == transition_id("run-1", "firing", 300), len(t.id)
        (True, 32)
    """

    kind: TransitionKind
    step: int
    key: str = ""
    fired_at_step: int | None = None

    @property
    def id(self) -> str:
        """Stable id from (key, kind, step), for receivers to deduplicate on."""
        return transition_id(self.key, self.kind, self.step)


def transition_id(key: str, kind: TransitionKind, step: int) -> str:
    """sha256 of key, kind and step; 32 hex digits (128 bits) so collisions never matter.

    Example:
        >>> transition_id("run-1", "firing", 300) == transition_id("run-1", "firing", 300)
        True
        >>> transition_id("run-1", "firing", 300) == transition_id("run-2", "firing", 300)
        False
    """
    # \x1f (unit separator) cannot be confused with text in a key, so ("a", ...) and
    # ("a\x1ffiring", ...) never hash alike by accident of concatenation.
    digest = hashlib.sha256(f"gradwatch-alert\x1f{key}\x1f{kind}\x1f{step}".encode())
    return digest.hexdigest()[:32]


def advance(
    policy: AlertPolicy, state: AlertState, alerting: bool, *, step: int, key: str = ""
) -> tuple[AlertState, Transition | None]:
    """The pure state machine: the next state after one check, and what to announce.

    `AlertTracker` wraps this for one alert; a service watching many alerts can keep an
    `AlertState` per alert and call `advance` itself.

    Example:
        >>> policy = AlertPolicy(fire_after=2)
        >>> state, t = advance(policy, AlertState(), True, step=10)
        >>> state.state, t
        ('pending', None)
        >>> state, t = advance(policy, state, True, step=20)
        >>> state.state, t.kind, t.step
        ('firing', 'firing', 20)
    """
    if state.state == "firing":
        return _advance_firing(policy, state, bool(alerting), step, key)
    if not alerting:  # inactive stays inactive; pending falls back silently
        return AlertState(ever_fired=state.ever_fired, fired_at_step=state.fired_at_step,
                          last_notified_step=state.last_notified_step), None
    streak = state.alerting_streak + 1
    active_since = state.active_since_step if state.active_since_step is not None else step
    # `>=` rather than `==`: a state saved under a larger fire_after still fires.
    if streak >= policy.fire_after:
        fired = AlertState(
            state="firing", alerting_streak=streak, active_since_step=active_since,
            fired_at_step=step, last_notified_step=step, ever_fired=True,
        )
        return fired, Transition(kind="firing", step=step, key=key, fired_at_step=step)
    pending = state.model_copy(
        update={"state": "pending", "alerting_streak": streak, "active_since_step": active_since}
    )
    return pending, None


def _advance_firing(
    policy: AlertPolicy, state: AlertState, alerting: bool, step: int, key: str
) -> tuple[AlertState, Transition | None]:
    if not alerting:
        cleared = state.clear_streak + 1
        if cleared >= policy.resolve_after:
            resolved = AlertState(fired_at_step=state.fired_at_step, last_notified_step=step,
                                  ever_fired=True)
            return resolved, Transition(
                kind="resolved", step=step, key=key, fired_at_step=state.fired_at_step
            )
        return state.model_copy(update={"clear_streak": cleared}), None
    # An alerting check while firing: the resolve count starts over.
    since_notified = state.since_notified + 1
    update: dict[str, Any] = {
        "alerting_streak": state.alerting_streak + 1, "clear_streak": 0,
        "since_notified": since_notified,
    }
    if policy.repeat_every is not None and since_notified >= policy.repeat_every:
        update.update(since_notified=0, last_notified_step=step)
        return state.model_copy(update=update), Transition(
            kind="repeat", step=step, key=key, fired_at_step=state.fired_at_step
        )
    return state.model_copy(update=update), None


class AlertTracker:
    """One alert's state machine: feed it every check, announce what it returns.

    Args:
        policy: when to fire, repeat and resolve (default `AlertPolicy()`: fire on the first
            alerting check, resolve on the first clean one, never repeat).
        key: what this alert watches (e.g. the MLflow run id, or "run-id/rule"); it makes
            `Transition.id` unique across runs. It may be set later, before the first transition.

    Example:
        >>> tracker = AlertTracker(AlertPolicy(fire_after=2, resolve_after=2), key="run-1")
        >>> [t.kind if t else None for t in (tracker.observe(a, step=s) for s, a in
        ...     enumerate([True, True, True, False, True, False, False]))]
        [None, 'firing', None, None, None, None, 'resolved']
        >>> tracker.state.state, tracker.state.fired_at_step
        ('inactive', 1)
    """

    def __init__(self, policy: AlertPolicy | None = None, *, key: str = "") -> None:
        if policy is None:
            policy = AlertPolicy()
        if not isinstance(policy, AlertPolicy):
            raise ConfigError(
                f"policy must be a gradwatch AlertPolicy, got {type(policy).__name__}; "
                f"{_POLICY_EXAMPLE}."
            )
        if not isinstance(key, str):
            raise ConfigError(f"key must be a str (e.g. the run id), got {type(key).__name__}.")
        self.policy = policy
        self.key = key
        self._state = AlertState()

    def __repr__(self) -> str:
        return f"AlertTracker({self.policy!r}, key={self.key!r}, state={self._state.state!r})"

    @property
    def state(self) -> AlertState:
        """The current state (immutable; replaced on every check)."""
        return self._state

    def observe(self, alerting: bool, *, step: int) -> Transition | None:
        """Record one check; returns the transition to announce, if any."""
        self._state, transition = advance(
            self.policy, self._state, bool(alerting), step=step, key=self.key
        )
        return transition

    def reset(self) -> None:
        """Forget everything, as if no check had run."""
        self._state = AlertState()

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict for checkpoints (the policy is not saved: it is configuration)."""
        return {"version": STATE_VERSION, **self._state.model_dump(mode="json")}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from `state_dict`; missing keys take their defaults so old saves still load."""
        defaults = AlertState()
        values = {
            name: state_dict.get(name, getattr(defaults, name)) for name in AlertState.model_fields
        }
        try:
            self._state = AlertState.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}, got {e.get('input')!r}"
                for e in exc.errors()
            )
            raise InputError(
                f"Cannot load the alert state: {problems}. Expected a dict from "
                f"AlertTracker.state_dict(); pass {{}} to start from an inactive alert."
            ) from None
