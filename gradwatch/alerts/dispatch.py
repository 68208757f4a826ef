"""`Dispatcher`: notification delivery off the calling thread, that never blocks training.

Imports: gradwatch.common, gradwatch.alerts.notify, gradwatch.alerts.channels,
gradwatch.alerts.redact.

`submit` only enqueues; one daemon worker sends to each notifier with retries and exponential
backoff; `flush` and `close` wait for it. Notifiers are logged by their redacted names and
errors by `describe`, so no log record carries a secret.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from heapq import heappop, heappush

from gradwatch.alerts.channels import make_notifier
from gradwatch.alerts.notify import Notification, Notifier
from gradwatch.alerts.redact import describe, scrub_urls
from gradwatch.common.errors import ConfigError

__all__ = ["Dispatcher"]


@dataclass(eq=False)
class _Lane:
    """One notifier and its counts."""

    notifier: Notifier
    label: str
    sent: int = 0
    failed: int = 0
    retried: int = 0
    dropped: int = 0


@dataclass(eq=False)
class _Job:
    notification: Notification
    lane: _Lane
    attempts: int = 0


class Dispatcher:
    """Deliver notifications on a background thread, with retries; never raise, never block.

    Args:
        notifiers: `Notifier`s, or URL strings for `make_notifier`.
        max_attempts: tries per notification and notifier (the first included).
        backoff_initial, backoff_max: retry n waits min(backoff_max, backoff_initial·2ⁿ⁻¹),
            jittered into its upper half (×U[0.5, 1)) so that many runs do not retry in step;
            a receiver's ``Retry-After`` is honoured up to backoff_max.
        max_pending: deliveries queued or in flight beyond this are dropped (and counted),
            so a dead receiver cannot grow memory without bound.
        sleep: waits between retries (`sleep(seconds)`). Default: a wait that `submit` and
            `close` cut short, so new notifications to healthy notifiers are not held up by a
            retry that is not yet due, and `close` never waits out a backoff.
        clock: monotonic seconds, to schedule retries.
        rng: jitter source (default: a private `random.Random()`, never the global one).
        logger: where failures are logged, with notifiers named by `redact`.

    `flush` and `close` timeouts are wall-clock seconds, whatever `clock` is.

    Example:
        >>> sent = []
        >>> class Collect:
        ...     name = "collect"
        ...     def send(self, notification): sent.append(notification.id)
        >>> with Dispatcher([Collect()]) as dispatcher:
        ...     dispatcher.submit(Notification(id="a1", kind="firing", title="t"))
        >>> sent, dispatcher.stats
        (['a1'], {'collect': {'sent': 1, 'failed': 0, 'retried': 0, 'dropped': 0}})
    """

    def __init__(
        self,
        notifiers: Iterable[Notifier | str],
        *,
        max_attempts: int = 5,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        max_pending: int = 1000,
        sleep: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        _check_count("max_attempts", max_attempts, "5")
        _check_count("max_pending", max_pending, "1000")
        for name, value in (("backoff_initial", backoff_initial), ("backoff_max", backoff_max)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value >= 0
            ):
                raise ConfigError(f"{name} must be a finite number of seconds ≥ 0, got {value!r}.")
        if backoff_max < backoff_initial:
            raise ConfigError(
                f"backoff_max must be ≥ backoff_initial, got backoff_initial={backoff_initial!r}"
                f" and backoff_max={backoff_max!r}. Defaults: 0.5 and 30."
            )
        self._lanes = _make_lanes(notifiers)
        self.max_attempts = max_attempts
        self.backoff_initial = float(backoff_initial)
        self.backoff_max = float(backoff_max)
        self.max_pending = max_pending
        self._sleep = sleep if sleep is not None else self._interruptible_sleep
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._logger = logger if logger is not None else logging.getLogger("gradwatch")
        self._changed = threading.Condition(threading.Lock())
        self._wake = threading.Event()
        self._jobs: list[tuple[float, int, _Job]] = []  # heap of (due, seq, job)
        self._seq = itertools.count()
        self._in_flight = 0
        self._closed = False  # no more submissions
        self._stopping = False  # the worker drops what is left and exits
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        names = ", ".join(lane.label for lane in self._lanes)
        return f"Dispatcher([{names}], max_attempts={self.max_attempts}, pending={self.pending})"

    def __enter__(self) -> Dispatcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -------------------------------------------------------------------- caller side
    @property
    def stats(self) -> dict[str, dict[str, int]]:
        """Per notifier name: sent, failed (gave up), retried (retries scheduled), dropped."""
        with self._changed:
            return {
                lane.label: {"sent": lane.sent, "failed": lane.failed,
                             "retried": lane.retried, "dropped": lane.dropped}
                for lane in self._lanes
            }

    @property
    def pending(self) -> int:
        """Deliveries queued or being sent now."""
        with self._changed:
            return len(self._jobs) + self._in_flight

    def submit(self, notification: Notification) -> None:
        """Queue `notification` for every notifier and return at once. Never raises."""
        try:
            self._submit(notification)
        except Exception as exc:
            self._log(logging.ERROR, "gradwatch: could not queue a notification: %s",
                      describe(exc))

    def _submit(self, notification: Notification) -> None:
        if not isinstance(notification, Notification):
            self._log(logging.ERROR, "gradwatch: submit() expects a Notification, got %s; "
                      "dropped", type(notification).__name__)
            return
        with self._changed:
            if self._closed:
                for lane in self._lanes:
                    lane.dropped += 1
                reason = "the dispatcher is closed"
            else:
                now, full = self._clock(), 0
                for lane in self._lanes:
                    if len(self._jobs) + self._in_flight >= self.max_pending:
                        lane.dropped += 1
                        full += 1
                    else:
                        heappush(self._jobs, (now, next(self._seq), _Job(notification, lane)))
                reason = f"{self.max_pending} deliveries are already queued" if full else ""
                self._start_worker()
                self._changed.notify_all()
        self._wake.set()
        if reason:
            self._log(logging.WARNING, "gradwatch: notification %s dropped: %s",
                      notification.id, reason)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until nothing is queued or being sent; False if `timeout` seconds ran out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while self._jobs or self._in_flight:
                if self._thread is None or not self._thread.is_alive():
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._changed.wait(remaining)
        return True

    def close(self, timeout: float | None = 10.0) -> bool:
        """Flush for up to `timeout` seconds, drop what is left (counted), stop the worker.

        Returns whether everything was delivered or given up on before the timeout.
        """
        started = time.monotonic()
        drained = self.flush(timeout)
        with self._changed:
            self._closed = self._stopping = True
            left = len(self._jobs)
            while self._jobs:
                heappop(self._jobs)[2].lane.dropped += 1
            self._changed.notify_all()
        self._wake.set()
        if left:
            self._log(logging.WARNING, "gradwatch: %d notification deliveries were still "
                      "queued at close and are dropped", left)
        if self._thread is not None:
            remaining = None if timeout is None else timeout - (time.monotonic() - started)
            self._thread.join(None if remaining is None else max(remaining, 0.0))
        return drained

    def _start_worker(self) -> None:  # called with the lock held
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._work, name="gradwatch-notify", daemon=True
            )
            self._thread.start()

    def _log(self, level: int, message: str, *args: object) -> None:
        with contextlib.suppress(Exception):  # a broken handler must not break the worker
            self._logger.log(level, message, *args)

    # -------------------------------------------------------------------- worker side
    def _work(self) -> None:
        while True:
            try:
                job, wait = self._take()
                if job is None and wait is None:
                    return
                if job is None:
                    self._sleep(wait or 0.0)
                    continue
                try:
                    self._deliver(job)
                finally:
                    with self._changed:
                        self._in_flight -= 1
                        self._changed.notify_all()
            except Exception as exc:  # keep the worker alive whatever happens
                self._log(logging.ERROR, "gradwatch: notification worker error: %s",
                          describe(exc))
                self._wake.wait(0.5)  # and do not spin if it happens again at once

    def _take(self) -> tuple[_Job | None, float | None]:
        """The next due job; or (None, seconds until one is due); or (None, None) to exit."""
        with self._changed:
            while True:
                if self._stopping:
                    return None, None
                if not self._jobs:
                    if self._closed:
                        return None, None
                    self._changed.wait()
                    continue
                due = self._jobs[0][0]
                now = self._clock()
                if due > now:
                    return None, due - now
                job = heappop(self._jobs)[2]
                self._in_flight += 1
                return job, None

    def _deliver(self, job: _Job) -> None:
        job.attempts += 1
        lane = job.lane
        try:
            lane.notifier.send(job.notification)
        except Exception as exc:
            self._failed(job, exc)
            return
        with self._changed:
            lane.sent += 1
        if job.attempts > 1:
            self._log(logging.INFO, "gradwatch: notification %s delivered to %s after %d "
                      "attempts", job.notification.id, lane.label, job.attempts)

    def _failed(self, job: _Job, exc: Exception) -> None:
        lane = job.lane
        retryable = bool(getattr(exc, "retryable", True))
        if retryable and job.attempts < self.max_attempts:
            delay = self._backoff(job.attempts, getattr(exc, "retry_after", None))
            with self._changed:
                if self._stopping:
                    lane.dropped += 1
                    return
                lane.retried += 1
                heappush(self._jobs, (self._clock() + delay, next(self._seq), job))
            self._log(logging.WARNING, "gradwatch: notification %s to %s failed (attempt %d of "
                      "%d): %s; retrying in %.2g s", job.notification.id, lane.label,
                      job.attempts, self.max_attempts, describe(exc), delay)
            return
        with self._changed:
            lane.failed += 1
        why = "" if retryable else " (not retryable)"
        self._log(logging.ERROR, "gradwatch: gave up on notification %s to %s after %d "
                  "attempt(s)%s: %s", job.notification.id, lane.label, job.attempts, why,
                  describe(exc))

    def _backoff(self, attempts: int, retry_after: object) -> float:
        # Exponential: initial·2^(n−1), capped; "equal jitter" keeps at least half of it.
        base = min(self.backoff_max, self.backoff_initial * 2.0 ** min(attempts - 1, 60))
        delay = base * (0.5 + 0.5 * self._rng.random())
        if isinstance(retry_after, (int, float)) and math.isfinite(retry_after):
            delay = max(delay, min(float(retry_after), self.backoff_max))
        return delay

    def _interruptible_sleep(self, seconds: float) -> None:
        self._wake.wait(seconds)
        self._wake.clear()


def _check_count(name: str, value: object, default: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an int ≥ 1 (default {default}), got {value!r}.")


def _make_lanes(notifiers: Iterable[Notifier | str]) -> list[_Lane]:
    if isinstance(notifiers, (str, bytes)) or not isinstance(notifiers, Iterable):
        raise ConfigError(f"notifiers must be a list of Notifiers or URLs, got "
                          f"{type(notifiers).__name__}; wrap a single one in a list.")
    lanes: list[_Lane] = []
    seen: dict[str, int] = {}
    for spec in notifiers:
        notifier = make_notifier(spec)
        label = scrub_urls(str(getattr(notifier, "name", "") or type(notifier).__name__))
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:  # two slack:// URLs both read "slack://***"
            label = f"{label} #{seen[label]}"
        lanes.append(_Lane(notifier, label))
    return lanes
