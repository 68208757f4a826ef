"""Secrets kept out of names and logs: URLs and error texts with their secrets as ``***``.

`redact` shows a notifier URL with every part that may hold a secret replaced by ``***``;
`scrub_urls` and `scrub` clean error texts of the URLs and secret pieces they may quote.

Imports: nothing else of gradwatch (the standard library only).

Secrets never reach a log record from the notification path: notifiers are named by `redact`,
error texts are built by gradwatch or pass through `scrub_urls` / `scrub`, and no traceback is
logged (exception messages of a chained error may quote a URL); `describe` is the one-line,
secret-free account of an exception. apprise's own logger ("apprise") can still print a URL it
cannot parse; keep it at WARNING or above, or check URLs before deploying them.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Sequence
from ipaddress import ip_address

__all__ = [
    "HTTP_SCHEMES",
    "MASK",
    "URL_SCHEME",
    "describe",
    "redact",
    "scrub",
    "scrub_urls",
    "secret_parts",
]

MASK = "***"
#: The schemes the built-in JSON webhook posts to (all others go to apprise).
HTTP_SCHEMES = frozenset({"http", "https"})
#: A URL scheme as RFC 3986 spells it ("https", "slack", "mailto", ...).
URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
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
    if not sep or not URL_SCHEME.fullmatch(scheme):
        opaque = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", text)  # "mailto:me@example.com"
        return f"{opaque.group(1).lower()}:{MASK}" if opaque else MASK
    scheme = scheme.lower()
    netloc = re.match(r"[^/?#]*", rest).group()  # type: ignore[union-attr]  # always matches
    tail = rest[len(netloc):]
    userinfo_sep, host = netloc.rpartition("@")[1:]
    # An '@' after the host but none before it: a password with an unescaped '/', '?' or '#'
    # split the URL, and what looks like host:port may be user:password. Hide it.
    suspicious = "@" in tail and not userinfo_sep
    safe_host = None if suspicious else _safe_host(host, http=scheme in HTTP_SCHEMES)
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


def scrub_urls(text: str) -> str:
    """`text` with every URL in it redacted (for error messages we did not write)."""
    return _URL_IN_TEXT.sub(lambda match: redact(match.group()), text)


def describe(exc: BaseException, limit: int = 300) -> str:
    """A one-line, secret-free account of `exc` for a log record."""
    try:
        message = scrub_urls(str(exc))
    except Exception:  # an exception whose __str__ fails still gets logged
        message = "(no message)"
    text = f"{type(exc).__name__}: {message}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def secret_parts(url: str) -> list[str]:
    """The pieces of `url` that `redact` hides, longest first, to scrub from error texts."""
    shown = redact(url)
    pieces = {url}
    for piece in re.split(r"[/:@?&=#;,\s]+", url):
        pieces.update({piece, urllib.parse.unquote(piece)})
    return sorted((p for p in pieces if len(p) >= 4 and p not in shown), key=len, reverse=True)


def scrub(text: str, secrets: Sequence[str]) -> str:
    """`text` with each of `secrets` (from `secret_parts`) and every URL in it hidden."""
    for secret in secrets:
        text = text.replace(secret, MASK)
    return scrub_urls(text)
