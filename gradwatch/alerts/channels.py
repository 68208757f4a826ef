"""The notifiers that come with gradwatch, and `make_notifier`, which picks one from a URL.

Imports: gradwatch.common, gradwatch.alerts.notify, gradwatch.alerts.redact.

- `JsonWebhook` — plain ``http://`` and ``https://`` URLs. POSTs `Notification.payload()`
  with the standard library (no extra dependency) and an ``Idempotency-Key`` header.
- `AppriseNotifier` — every other scheme (``slack://``, ``mailto://``, ``tgram://``,
  ``discord://``, and apprise's own ``json://`` / ``jsons://``, ...), through the optional
  ``apprise`` package (``pip install 'gradwatch[apprise]'``). Note that apprise's
  ``json://host/path`` posts apprise's own payload (title, message, type), not ours: use the
  ``https://host/path`` form to get gradwatch's payload.
- `make_notifier`: that choice, made from a string (an object that is already a `Notifier`
  passes through).

Both are named by `redact` and scrub their error texts (`scrub`), so neither a log line nor a
`DeliveryError` carries a secret.
"""

from __future__ import annotations

import http.client
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from gradwatch.alerts.notify import Notification, Notifier
from gradwatch.alerts.redact import (
    HTTP_SCHEMES,
    URL_SCHEME,
    describe,
    redact,
    scrub,
    secret_parts,
)
from gradwatch.common.errors import ConfigError, DeliveryError, missing_dependency
from gradwatch.common.version import __version__

__all__ = ["RETRYABLE_STATUSES", "AppriseNotifier", "JsonWebhook", "make_notifier"]

_URL_EXAMPLES = "'https://hooks.example.com/gradwatch' (JSON webhook) or 'slack://…' (apprise)"


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
        if not isinstance(url, str) or url.partition("://")[0].lower() not in HTTP_SCHEMES:
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
        self._secrets = secret_parts(url) + [v for v in extra.values() if len(v) >= 4]
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
                f"could not reach {self._name}: {scrub(text, self._secrets)}"
            ) from None
        if not 200 <= status < 300:  # 1xx never gets here; kept for clarity
            raise self._status_error(status, "", None)

    def _status_error(self, status: int, reason: object, headers: Any) -> DeliveryError:
        retry_after = _retry_after_seconds(headers.get("Retry-After") if headers else None)
        text = scrub(str(reason), self._secrets)
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
        self._secrets = [s for u in url_list for s in secret_parts(u)]

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
                f"{scrub(describe(exc), self._secrets)}"
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
        if not sep or not URL_SCHEME.fullmatch(scheme):
            raise ConfigError(f"A notifier URL needs a scheme, e.g. {_URL_EXAMPLES}; "
                              f"got {redact(spec)!r}.")
        if scheme.lower() in HTTP_SCHEMES:
            return JsonWebhook(spec.strip())
        return AppriseNotifier(spec.strip())
    if isinstance(spec, Notifier):
        return spec
    raise ConfigError(f"A notifier must be a URL such as {_URL_EXAMPLES}, or an object with a "
                      f"`name` and `send(notification)`; got {type(spec).__name__}.")
