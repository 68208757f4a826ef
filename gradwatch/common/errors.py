"""The one exception tree of gradwatch.

Catch at the level you need::

    GradwatchError                 base of everything gradwatch raises on purpose
    ├── ConfigError (ValueError)   a setting is invalid: eps, mode, thresholds, budget, globs
    ├── InputError (ValueError)    params, grads, model or batch do not fit together
    │   ├── LossError              the loss could not be computed or is not a scalar
    │   └── UnsupportedModelError  the model cannot be checked at all (sharded: FSDP, ZeRO-3)
    ├── MissingDependencyError (ImportError)
    │                              an optional extra (torch, ...) is not installed
    ├── GradientAlertError         a check alerted and GradWatch(on_alert="raise") was asked
    ├── DeliveryError              a notifier could not deliver (never carries a secret)
    ├── SpoolLockedError           another process owns the local spool directory
    └── MonitorLockedError         another monitor holds the monitor's state lock

Every message says what was expected, what was got, and how to fix it.

Imports: nothing else of gradwatch.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "ConfigError",
    "DeliveryError",
    "GradientAlertError",
    "GradwatchError",
    "InputError",
    "LossError",
    "MissingDependencyError",
    "MonitorLockedError",
    "MonitorStandbyError",
    "SpoolLockedError",
    "UnsupportedModelError",
]


class GradwatchError(Exception):
    """Base class of every error gradwatch raises on purpose."""


class ConfigError(GradwatchError, ValueError):
    """A gradwatch setting is invalid (eps, mode, thresholds, budget, include/exclude)."""


class InputError(GradwatchError, ValueError):
    """The inputs do not fit together: params vs grads, model vs batch, parameter dtypes."""


class LossError(InputError):
    """The loss could not be computed from the inputs, or is not a real scalar."""


class UnsupportedModelError(InputError):
    """The model cannot be checked by gradwatch at all (e.g. its parameters are sharded across
    ranks); `GradWatch` logs the reason once, records one "error" check and stops checking."""


class MissingDependencyError(GradwatchError, ImportError):
    """An optional dependency is needed for this call but is not installed."""


def missing_dependency(feature: str, package: str, extra: str) -> MissingDependencyError:
    """Build the standard 'Using X, but Y is not installed' error."""
    return MissingDependencyError(
        f"Using {feature}, but the '{package}' package is not installed. "
        f"Install it with `pip install 'gradwatch[{extra}]'`."
    )


class GradientAlertError(GradwatchError):
    """A gradient check alerted and `GradWatch(on_alert="raise")` asked to stop training."""


class DeliveryError(GradwatchError):
    """A notifier could not deliver a notification. The message never contains a secret.

    `retryable` is False when trying again cannot help (HTTP 400, 401, 403, 404, ...);
    `retry_after` is the wait in seconds the receiver asked for (HTTP ``Retry-After``).
    """

    def __init__(
        self, message: str, *, retryable: bool = True, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


# ---------------------------------------------------------------------------- the message


LOCKED_HELP = (
    "Only one process may own a spool at a time. Wait for that process to end (it delivers "
    "what it can on exit), then run `gradwatch flush` to deliver anything it left; or give "
    "this process its own spool directory (set GRADWATCH_SPOOL_DIR)."
)


class SpoolLockedError(GradwatchError):
    """Another process (or another `Spool` in this one) owns the spool directory."""

    def __init__(self, directory: Path, pid: int | None) -> None:
        self.directory = directory
        self.pid = pid
        if pid is None:
            holder = "another process (PID unknown)"
        elif pid == os.getpid():
            holder = f"another Spool in this process (PID {pid}); close that one first"
        else:
            holder = f"process PID {pid}"
        super().__init__(f"The gradwatch spool {directory} is in use by {holder}. {LOCKED_HELP}")


MONITOR_LOCKED_HELP = (
    "Only one `gradwatch monitor` may use a state file at a time. Stop the other monitor, or "
    "give this one its own state file; to read the state while a monitor runs (e.g. "
    "`gradwatch monitor status`), open it with lock=False."
)


class MonitorStandbyError(GradwatchError):
    """Another monitor replica holds the state's lease (`gradwatch.monitor.lease`)."""

    def __init__(self, holder: str) -> None:
        super().__init__(
            f"Another gradwatch monitor is active on this state ({holder}); a one-off "
            f"`--once` would race it. Let the active monitor do its work, stop it first, or "
            f"run `gradwatch monitor` without --once to wait as a standby.")


class MonitorLockedError(GradwatchError):
    """Another monitor (or another `MonitorState` in this process) holds the state file's lock."""

    def __init__(self, lock_path: Path, pid: int | None) -> None:
        self.lock_path = lock_path
        self.pid = pid
        if pid is None:
            holder = "another process (PID unknown)"
        elif pid == os.getpid():
            holder = f"another MonitorState in this process (PID {pid}); close that one first"
        else:
            holder = f"process PID {pid}"
        super().__init__(
            f"The gradwatch monitor state locked by {lock_path} is in use by {holder}. "
            f"{MONITOR_LOCKED_HELP}"
        )
