"""Notifications: what an alert says, where it goes, and delivery that never blocks training.

The pieces, smallest first:

- `Notification`: one announcement (firing, repeat, resolved) as a JSON-serialisable model.
  Its `id` comes from the alert's `Transition.id`, so it is the same on every retry and on a
  replay after a resume: receivers deduplicate on it.
- `redact`: a URL with its secrets replaced by ``***`` (scheme and host kept), for logs.
- `Notifier`: anything with a redacted `name` and `send(notification)` that raises on failure.
  Two come with gradwatch:

  * `JsonWebhook` — plain ``http://`` and ``https://`` URLs. POSTs `Notification.payload()`
    with the standard library (no extra dependency) and an ``Idempotency-Key`` header.
  * `AppriseNotifier` — every other scheme (``slack://``, ``mailto://``, ``tgram://``,
    ``discord://``, and apprise's own ``json://`` / ``jsons://``, ...), through the optional
    ``apprise`` package (``pip install 'gradwatch[apprise]'``). Note that apprise's
    ``json://host/path`` posts apprise's own payload (title, message, type), not ours: use the
    ``https://host/path`` form to get gradwatch's payload.

- `make_notifier`: that choice, made from a string (an object that is already a `Notifier`
  passes through).
- `Dispatcher`: delivery off the calling thread. `submit` only enqueues; one daemon worker
  sends to each notifier with retries and exponential backoff; `flush` and `close` wait for it.

Secrets never reach a log record from here: notifiers are named by `redact`, error texts are
built by gradwatch or pass through the same redaction, and no traceback is logged (exception
messages of a chained error may quote a URL). apprise's own logger ("apprise") can still print
a URL it cannot parse; keep it at WARNING or above, or check URLs before deploying them.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import logging
import math
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from heapq import heappop, heappush
from ipaddress import ip_address
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from gradwatch.alerts.state import Transition, TransitionKind
from gradwatch.common.errors import (
    ConfigError,
    DeliveryError,
    InputError,
    missing_dependency,
)
from gradwatch.common.version import __version__

__all__ = [
    "AppriseNotifier",
    "DeliveryError",
    "Dispatcher",
    "JsonWebhook",
    "Notification",
    "Notifier",
    "Severity",
    "make_notifier",
    "redact",
]

Severity = Literal["info", "warning", "critical"]

#: Bumped when a field of the webhook payload changes meaning.
NOTIFICATION_SCHEMA_VERSION = 1

MASK = "***"
_HTTP_SCHEMES = frozenset({"http", "https"})
_URL_EXAMPLES = "'https://hooks.example.com/gradwatch' (JSON webhook) or 'slack://…' (apprise)"


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


# ---------------------------------------------------------------------------- redaction
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_TLD = re.compile(r"[A-Za-z]{2,63}")
_HTTP_HOST = re.compile(r"[A-Za-z0-9._~%-]+")
# A query parameter name is kept only when it reads like a word ("token", "to", "+X-Api-Key"):
# no digits, so a token used as a bare name is hidden with the values.
_QUERY_NAME = re.compile(r"[+:-]?[A-Za-z][A-Za-z_.-]{0,31}")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{}]+")


def redact(url: str) -> str:
    """`url` with every part that may hold a secret replaced by ``***``; never raises.

    Kept: the scheme; for http(s) the host and port; for other schemes the host only when it
    looks like a real host name or IP address (apprise puts tokens where the host goes, as in
    ``slack://TokenA/TokenB/TokenC``); query parameter *names*. Hidden: user and password, the
    path, query values, the fragment.

    Example:
        >>> redact("https://hooks.example.com/services/T00/B00/XXXX?token=abc&channel=ops")
        'https://hooks.example.com/***?token=***&channel=***'
        >>> redact("slack://TokenA/TokenB/TokenC")
        'slack://***'
        >>> redact("mailto://me:hunter2@gmail.com")
        'mailto://***@gmail.com'
        >>> redact("json://127.0.0.1:8080/alerts")
        'json://127.0.0.1:8080/***'
    """
    try:
        return _redact(url)
    except Exception:  # a redactor that raises would take the log line (or the caller) down
        return MASK


def _redact(url: str) -> str:
    text = str(url).strip()
    scheme, sep, rest = text.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        opaque = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", text)  # "mailto:me@example.com"
        return f"{opaque.group(1).lower()}:{MASK}" if opaque else MASK
    scheme = scheme.lower()
    netloc = re.match(r"[^/?#]*", rest).group()  # type: ignore[union-attr]  # always matches
    tail = rest[len(netloc):]
    userinfo_sep, host = netloc.rpartition("@")[1:]
    # An '@' after the host but none before it: a password with an unescaped '/', '?' or '#'
    # split the URL, and what looks like host:port may be user:password. Hide it.
    suspicious = "@" in tail and not userinfo_sep
    safe_host = None if suspicious else _safe_host(host, http=scheme in _HTTP_SCHEMES)
    if safe_host is None:
        return f"{scheme}://{MASK}{_redact_query(tail)}"
    path = re.match(r"[^?#]*", tail).group()  # type: ignore[union-attr]  # always matches
    redacted = f"{scheme}://{MASK + '@' if userinfo_sep else ''}{safe_host}"
    if path not in ("", "/"):
        redacted += "/" + MASK
    elif path == "/":
        redacted += "/"
    return redacted + _redact_query(tail)


def _safe_host(hostport: str, *, http: bool) -> str | None:
    """`hostport` when it is a plain host[:port] worth showing, else None (hide it)."""
    if hostport.startswith("["):  # [IPv6]:port
        address, bracket, port = hostport[1:].partition("]")
        if not bracket or not _is_ip(address) or (port and not re.fullmatch(r":[0-9]{1,5}", port)):
            return None
        return hostport
    host, colon, port = hostport.partition(":")
    if colon and not re.fullmatch(r"[0-9]{1,5}", port):
        return None  # "123456:ABC-token" is a Telegram bot token, not host:port
    if not host:
        return None
    if http:
        return hostport if _HTTP_HOST.fullmatch(host) else None
    return hostport if _looks_like_host(host) else None


def _looks_like_host(host: str) -> bool:
    if host.lower() == "localhost" or _is_ip(host):
        return True
    labels = host.split(".")
    return (
        len(labels) >= 2
        and all(_DNS_LABEL.fullmatch(label) for label in labels)
        and _TLD.fullmatch(labels[-1]) is not None
    )


def _is_ip(text: str) -> bool:
    try:
        ip_address(text)
    except ValueError:
        return False
    return True


def _redact_query(tail: str) -> str:
    before_fragment, has_fragment, _ = tail.partition("#")
    fragment = f"#{MASK}" if has_fragment else ""
    query = before_fragment.partition("?")[2]
    items = []
    for item in re.split(r"[&;]", query):
        if not item:
            continue
        name, equals = item.partition("=")[:2]
        items.append(f"{name}={MASK}" if equals and _QUERY_NAME.fullmatch(name) else MASK)
    return ("?" + "&".join(items) if items else "") + fragment


def _scrub_urls(text: str) -> str:
    """`text` with every URL in it redacted (for error messages we did not write)."""
    return _URL_IN_TEXT.sub(lambda match: redact(match.group()), text)


def _describe(exc: BaseException, limit: int = 300) -> str:
    """A one-line, secret-free account of `exc` for a log record."""
    try:
        message = _scrub_urls(str(exc))
    except Exception:  # an exception whose __str__ fails still gets logged
        message = "(no message)"
    text = f"{type(exc).__name__}: {message}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _secret_parts(url: str) -> list[str]:
    """The pieces of `url` that `redact` hides, longest first, to scrub from error texts."""
    shown = redact(url)
    pieces = {url}
    for piece in re.split(r"[/:@?&=#;,\s]+", url):
        pieces.update({piece, urllib.parse.unquote(piece)})
    return sorted((p for p in pieces if len(p) >= 4 and p not in shown), key=len, reverse=True)


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, MASK)
    return _scrub_urls(text)


# ---------------------------------------------------------------------------- notifiers
@runtime_checkable
class Notifier(Protocol):
    """Where notifications go. `name` is shown in logs, so it must hold no secret (use
    `redact`); `send` delivers one notification or raises (ideally `DeliveryError`)."""

    @property
    def name(self) -> str: ...

    def send(self, notification: Notification) -> None: ...


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # urllib turns a redirected POST into a GET without the body, which a receiver then
    # answers with 200: a lost alert reported as delivered. A 3xx is a failure here.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


#: HTTP statuses worth retrying; any other non-2xx will fail the same way again.
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class JsonWebhook:
    """POST `Notification.payload()` as JSON to an http(s) URL with the standard library.

    Headers: ``Content-Type: application/json``, ``Idempotency-Key: <notification id>``, a
    gradwatch ``User-Agent``, then `headers` (e.g. an ``Authorization``; never logged).
    Any status outside 2xx raises `DeliveryError`; redirects are not followed.

    Example:
        >>> JsonWebhook("https://hooks.example.com/T0/secret", timeout=5)
        JsonWebhook('https://hooks.example.com/***', timeout=5.0)
    """

    def __init__(
        self, url: str, *, timeout: float = 10.0, headers: Mapping[str, str] | None = None
    ) -> None:
        if not isinstance(url, str) or url.partition("://")[0].lower() not in _HTTP_SCHEMES:
            shown = redact(url) if isinstance(url, str) else type(url).__name__
            raise ConfigError(
                f"JsonWebhook needs an http:// or https:// URL, got {shown!r}. For other "
                f"schemes use make_notifier(url), which hands them to apprise."
            )
        try:
            parts = urllib.parse.urlsplit(url)
            valid = bool(parts.hostname) and (parts.port is None or parts.port > 0)
        except ValueError:  # "[::1" or a port that is not a number
            valid = False
        if not valid:
            raise ConfigError(f"JsonWebhook URL {redact(url)!r} has no valid host[:port]; "
                              f"expected e.g. 'https://hooks.example.com/gradwatch'.")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            math.isfinite(timeout) and timeout > 0
        ):
            raise ConfigError(f"timeout must be a finite number of seconds > 0 (default 10), "
                              f"got {timeout!r}.")
        extra = dict(headers or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise ConfigError("headers must map header names (str) to values (str), e.g. "
                              "{'Authorization': 'Bearer …'}.")
        self._url = url
        self._name = redact(url)
        self._secrets = _secret_parts(url) + [v for v in extra.values() if len(v) >= 4]
        self.timeout = float(timeout)
        self._headers = extra
        self._opener = urllib.request.build_opener(_NoRedirects())

    @property
    def name(self) -> str:
        """The redacted URL."""
        return self._name

    def __repr__(self) -> str:
        return f"JsonWebhook({self._name!r}, timeout={self.timeout})"

    def send(self, notification: Notification) -> None:
        """POST the notification once; raises `DeliveryError` unless the answer is 2xx."""
        request = urllib.request.Request(
            self._url, data=notification.to_json(), method="POST",
            headers={
                "Content-Type": "application/json",
                "Idempotency-Key": notification.id,
                "User-Agent": f"gradwatch/{__version__}",
                **self._headers,
            },
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            error = self._status_error(exc.code, exc.reason, exc.headers)
            exc.close()  # an unclosed error response warns when it is garbage-collected
            raise error from None
        except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError, timeouts
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            text = str(reason)
            if isinstance(reason, BaseException):
                text = f"{type(reason).__name__}: {text}"
            raise DeliveryError(
                f"could not reach {self._name}: {_scrub(text, self._secrets)}"
            ) from None
        if not 200 <= status < 300:  # 1xx never gets here; kept for clarity
            raise self._status_error(status, "", None)

    def _status_error(self, status: int, reason: object, headers: Any) -> DeliveryError:
        retry_after = _retry_after_seconds(headers.get("Retry-After") if headers else None)
        text = _scrub(str(reason), self._secrets)
        return DeliveryError(
            f"{self._name} answered HTTP {status}{' ' + text if text else ''}",
            retryable=status in RETRYABLE_STATUSES, retry_after=retry_after,
        )


def _retry_after_seconds(value: str | None) -> float | None:
    # Only the delta-seconds form; an HTTP date is rare from webhook receivers.
    if value is None or not re.fullmatch(r"[0-9]{1,9}", value.strip()):
        return None
    return float(value.strip())


class AppriseNotifier:
    """Send through apprise (slack://, mailto://, tgram://, discord://, json://, ...).

    Needs the optional ``apprise`` package. One `send` notifies every URL; apprise reports one
    success or failure for all, so a retry after a partial failure notifies all of them again
    (give each URL its own notifier, as `make_notifier` does, to avoid that).
    """

    def __init__(self, urls: str | Sequence[str]) -> None:
        try:
            import apprise
        except ImportError:
            raise missing_dependency("apprise notifications", "apprise", "apprise") from None
        url_list = [urls] if isinstance(urls, str) else list(urls)
        if not url_list or not all(isinstance(u, str) for u in url_list):
            raise ConfigError(f"AppriseNotifier needs one or more URL strings such as "
                              f"'slack://…' or 'mailto://…', got {type(urls).__name__}.")
        self._apprise = apprise.Apprise()
        for url in url_list:
            if not self._apprise.add(url):
                raise ConfigError(
                    f"apprise does not accept the URL {redact(url)!r}. Expected one of its "
                    f"service URLs (https://github.com/caronc/apprise/wiki); for a plain JSON "
                    f"webhook use an http:// or https:// URL."
                )
        self._types = {
            "info": apprise.NotifyType.INFO, "warning": apprise.NotifyType.WARNING,
            "critical": apprise.NotifyType.FAILURE, "resolved": apprise.NotifyType.SUCCESS,
        }
        self._text_format = apprise.NotifyFormat.TEXT
        self._name = ", ".join(redact(u) for u in url_list)
        self._secrets = [s for u in url_list for s in _secret_parts(u)]

    @property
    def name(self) -> str:
        """The redacted URLs."""
        return self._name

    def __repr__(self) -> str:
        return f"AppriseNotifier({self._name!r})"

    def send(self, notification: Notification) -> None:
        """Notify every URL once; raises `DeliveryError` if apprise reports a failure."""
        kind = "resolved" if notification.kind == "resolved" else notification.severity
        try:
            delivered = self._apprise.notify(
                body=notification.body or notification.title, title=notification.title,
                notify_type=self._types[kind], body_format=self._text_format,
            )
        except Exception as exc:
            raise DeliveryError(
                f"apprise raised while notifying {self._name}: "
                f"{_scrub(_describe(exc), self._secrets)}"
            ) from None
        if not delivered:
            raise DeliveryError(f"apprise could not deliver to {self._name} (its own log, "
                                f"logger 'apprise', says why)")


def make_notifier(spec: str | Notifier) -> Notifier:
    """A notifier for `spec`: http(s) URL → `JsonWebhook`, any other URL → `AppriseNotifier`.

    Example:
        >>> make_notifier("https://hooks.example.com/secret-path")
        JsonWebhook('https://hooks.example.com/***', timeout=10.0)
    """
    if isinstance(spec, str):
        scheme, sep, _ = spec.strip().partition("://")
        if not sep or not _SCHEME.fullmatch(scheme):
            raise ConfigError(f"A notifier URL needs a scheme, e.g. {_URL_EXAMPLES}; "
                              f"got {redact(spec)!r}.")
        if scheme.lower() in _HTTP_SCHEMES:
            return JsonWebhook(spec.strip())
        return AppriseNotifier(spec.strip())
    if isinstance(spec, Notifier):
        return spec
    raise ConfigError(f"A notifier must be a URL such as {_URL_EXAMPLES}, or an object with a "
                      f"`name` and `send(notification)`; got {type(spec).__name__}.")


# ---------------------------------------------------------------------------- delivery
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
                      _describe(exc))

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
                          _describe(exc))
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
                      job.attempts, self.max_attempts, _describe(exc), delay)
            return
        with self._changed:
            lane.failed += 1
        why = "" if retryable else " (not retryable)"
        self._log(logging.ERROR, "gradwatch: gave up on notification %s to %s after %d "
                  "attempt(s)%s: %s", job.notification.id, lane.label, job.attempts, why,
                  _describe(exc))

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
        label = _scrub_urls(str(getattr(notifier, "name", "") or type(notifier).__name__))
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:  # two slack:// URLs both read "slack://***"
            label = f"{label} #{seen[label]}"
        lanes.append(_Lane(notifier, label))
    return lanes
