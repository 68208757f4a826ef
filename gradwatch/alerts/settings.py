"""`AlertSettings`: the alert policy, where notifications go and what a firing alert does.

`GradWatch(alerts=AlertSettings(...))`, or its shorthands `alert_policy=`, `notify=`,
`on_alert=`. The notifiers are built (and their URLs checked) when the object is built; their
reprs redact secrets, so the object can be logged.

Imports: gradwatch.common, gradwatch.alerts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from gradwatch.alerts.channels import make_notifier
from gradwatch.alerts.notify import Notifier
from gradwatch.alerts.state import AlertPolicy
from gradwatch.common.errors import ConfigError
from gradwatch.common.settings import Settings

__all__ = ["ON_ALERT", "AlertSettings", "OnAlert"]

OnAlert = Literal["continue", "stop", "raise"]
ON_ALERT = ("continue", "stop", "raise")


@dataclass(frozen=True, kw_only=True, repr=False)
class AlertSettings(Settings):
    """What gradwatch does about a check whose verdict is "alert".

    Args:
        policy: pending/firing/resolved counted in checks (`AlertPolicy()`: fire at the first
            alerting check, resolve at the first good one, no repeats). `GradWatch`'s
            shorthand is `alert_policy=`.
        notify: apprise URLs ("slack://…", "mailto://…") or http(s) URLs for the built-in JSON
            webhook, or `Notifier` objects; one URL alone is taken as a list of one. Secrets
            in URLs are never logged nor sent to MLflow.
        on_alert: "continue", "stop" (ask the trainer to stop; HF `should_training_stop`) or
            "raise" (`GradientAlertError` out of `step()` / the HF event).

    Example:
        >>> AlertSettings(on_alert="stop", notify="https://hooks.example.com/secret")
        AlertSettings(notify=(JsonWebhook('https://hooks.example.com/***', timeout=10.0),), \
on_alert='stop')
        >>> AlertSettings(on_alert="halt")
        Traceback (most recent call last):
        ...
        gradwatch.ConfigError: on_alert must be one of ('continue', 'stop', \
'raise'), got 'halt'.
    """

    NONE_IS_DEFAULT: ClassVar[frozenset[str]] = frozenset({"policy"})

    policy: AlertPolicy = field(default_factory=AlertPolicy)
    notify: Sequence[str | Notifier] = ()
    on_alert: OnAlert = "continue"

    def __post_init__(self) -> None:
        self._fill_defaults()
        if not isinstance(self.policy, AlertPolicy):
            raise ConfigError(f"the alert policy must be a gradwatch.AlertPolicy, e.g. "
                              f"AlertPolicy(fire_after=2), got {type(self.policy).__name__}.")
        notify: Any = self.notify
        if isinstance(notify, (str, bytes)) or not hasattr(notify, "__iter__"):
            notify = [notify]  # one URL or one Notifier
        object.__setattr__(self, "notify", tuple(make_notifier(spec) for spec in notify))
        if self.on_alert not in ON_ALERT:
            raise ConfigError(f"on_alert must be one of {ON_ALERT}, got {self.on_alert!r}.")
