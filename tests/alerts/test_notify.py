"""Notifications: redaction, the payload, and delivery to a real receiver on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradwatch import ConfigError, DeliveryError, InputError
from gradwatch.alerts.channels import AppriseNotifier, JsonWebhook, make_notifier
from gradwatch.alerts.dispatch import Dispatcher
from gradwatch.alerts.notify import Notification, Notifier
from gradwatch.alerts.redact import redact
from gradwatch.alerts.state import Transition
from tests.support.receivers import ManualClock, WebhookReceiver, running_receiver

ROOT = Path(__file__).resolve().parents[2]
HAS_APPRISE = importlib.util.find_spec("apprise") is not None
needs_apprise = pytest.mark.skipif(not HAS_APPRISE, reason="the optional 'apprise' package is "
                                   "not installed (pip install 'gradwatch[apprise]')")
# apprise loads its plugins on first use; one imports the stdlib's deprecated imghdr (3.11, 3.12)
apprise_warnings = pytest.mark.filterwarnings("ignore:'imghdr' is deprecated:DeprecationWarning")

SECRET = "Tk9SECRETxyz42"


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with running_receiver() as started:
        yield started


def _notification(step: int = 300, kind: str = "firing") -> Notification:
    transition = Transition(kind=kind, step=step, key="run-1")  # type: ignore[arg-type]
    return Notification.from_transition(
        transition, title=f"gradwatch ALERT at step {step}", body="layer fc1: 0.3",
        run_id="run-1", details={"rel_distance": 0.3, "layers": ["fc1"]},
    )


def _dispatcher(notifiers: list, clock: ManualClock | None = None, **kwargs: object) -> Dispatcher:
    """A dispatcher on a manual clock (retries are immediate) with a seeded jitter."""
    clock = clock or ManualClock()
    return Dispatcher(notifiers, sleep=clock.sleep, clock=clock.clock, rng=random.Random(0),
                      **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------ redact
@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("https://hooks.example.com/services/T0/B0/XXXX", "https://hooks.example.com/***"),
        ("https://hooks.example.com", "https://hooks.example.com"),
        ("https://hooks.example.com/", "https://hooks.example.com/"),
        ("http://127.0.0.1:8080/hook?token=abc&key=k&secret=s&password=p&apikey=a",
         "http://127.0.0.1:8080/***?token=***&key=***&secret=***&password=***&apikey=***"),
        ("https://user:hunter2@example.com/x", "https://***@example.com/***"),
        ("https://ghp_abcdef123@github.com", "https://***@github.com"),
        ("HTTPS://[::1]:9000/a#frag", "https://[::1]:9000/***#***"),
        ("https://example.com/a#x?token=1", "https://example.com/***#***"),
        ("https://example.com?ABC123xyz", "https://example.com?***"),
        ("slack://TokenA/TokenB/TokenC", "slack://***"),
        ("slack://TokenA/TokenB/TokenC/#general", "slack://***#***"),
        ("discord://4174216298/JHMHI8qBe7bk2ZwO5U711o3dV_js", "discord://***"),
        ("tgram://123456789:ABCdefGHIjkl/987", "tgram://***"),
        ("mailto://me:hunter2@gmail.com", "mailto://***@gmail.com"),
        ("mailto://me:hunter2@gmail.com?to=ops@example.com", "mailto://***@gmail.com?to=***"),
        ("json://127.0.0.1:8080/alerts", "json://127.0.0.1:8080/***"),
        ("jsons://user:pw@hooks.example.com/x?+X-Token=abc",
         "jsons://***@hooks.example.com/***?+X-Token=***"),
        ("ntfy://mytopic", "ntfy://***"),
        ("gotify://gotify.example.com/AbCdEf123", "gotify://gotify.example.com/***"),
        ("https://user:pa/ss@example.com", "https://***"),
        ("mailto:me@example.com", "mailto:***"),
        ("not a url", "***"),
        ("", "***"),
        ("://nothing", "***"),
    ],
)
def test_redact_hides_secrets_and_keeps_scheme_and_host(url: str, redacted: str) -> None:
    assert redact(url) == redacted
    assert redact(redacted) == redacted


_token = st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZabcdefghjkmnpqrstuvwxyz0123456789_-",
                 min_size=4, max_size=40).map(lambda s: f"{SECRET}{s}")
_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=10).map(
    lambda s: f"h{s}"
)
_host = st.one_of(
    st.lists(_label, min_size=1, max_size=3).map(lambda labels: ".".join([*labels, "com"])),
    st.just("127.0.0.1"), st.just("localhost"), st.just("[::1]"),
)


@st.composite
def _urls_with_secrets(draw: st.DrawFn) -> tuple[str, str, str]:
    scheme = draw(st.sampled_from(["http", "https", "json", "slack", "mailto", "tgram"]))
    host = draw(_host)
    port = draw(st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}")))
    secret = draw(_token)
    where = draw(st.sampled_from(["password", "user", "path", "query", "fragment", "host"]))
    if where == "host" and scheme in ("http", "https"):
        where = "path"  # an http host is a host, shown on purpose
    netloc = f"{host}{port}"
    path, query, fragment = "/hooks", "", ""
    if where == "password":
        netloc = f"alice:{secret}@{netloc}"
    elif where == "user":
        netloc = f"{secret}@{netloc}"
    elif where == "host":
        netloc = f"{secret}{draw(st.sampled_from(['', ':ABC', ':123']))}"
    elif where == "path":
        path = f"/services/{secret}/{draw(_token)}"
    elif where == "query":
        name = draw(st.sampled_from(["token", "key", "secret", "password", "apikey", secret]))
        query = f"?format=json&{name}={secret}"
    else:
        fragment = f"#{secret}"
    return f"{scheme}://{netloc}{path}{query}{fragment}", scheme, host


@given(_urls_with_secrets())
@settings(max_examples=200, deadline=None)
def test_redact_never_shows_a_secret(case: tuple[str, str, str]) -> None:
    url, scheme, host = case
    redacted = redact(url)
    assert SECRET not in redacted
    assert redacted.startswith(f"{scheme}://")
    if scheme in ("http", "https"):
        assert host in redacted  # logs still say where it went
    assert redact(redacted) == redacted


@given(st.text())
@settings(max_examples=300, deadline=None)
def test_redact_never_raises_and_prints_only_safe_characters(text: str) -> None:
    redacted = redact(text)
    assert redacted.isprintable() and "\n" not in redacted
    assert redact(redacted) == redacted


# ------------------------------------------------------------------------ the notification
def test_notification_payload_is_strict_json_that_round_trips() -> None:
    notification = Notification.from_transition(
        Transition(kind="resolved", step=5, key="k"), title="ok again",
        details={"rel_distance": math.nan, "nested": {"inf": math.inf, "list": [1, None]}},
    )
    assert notification.severity == "info"
    payload = json.loads(notification.to_json())  # strict: no bare NaN
    assert payload == notification.payload()
    assert payload["details"] == {"rel_distance": "NaN", "nested": {"inf": "Infinity",
                                                                    "list": [1, None]}}
    assert payload["id"] == Transition(kind="resolved", step=5, key="k").id
    assert payload["schema_version"] == 1
    assert set(payload) == {"schema_version", "id", "kind", "title", "body", "severity",
                            "run_id", "step", "details"}


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"id": "", "kind": "firing", "title": "t"}, "id"),
        ({"id": "a", "kind": "pending", "title": "t"}, "kind"),
        ({"id": "a", "kind": "firing", "title": "t", "severity": "fatal"}, "severity"),
        ({"id": "a", "kind": "firing", "title": "t", "details": {"x": object()}}, "details"),
        ({"id": "a", "kind": "firing", "title": "t", "colour": "red"}, "colour"),
    ],
)
def test_a_bad_notification_is_an_input_error(kwargs: dict, word: str) -> None:
    with pytest.raises(InputError, match=word):
        Notification(**kwargs)


# ------------------------------------------------------------------------ choosing notifiers
def test_make_notifier_sends_http_urls_to_the_built_in_webhook() -> None:
    notifier = make_notifier("https://hooks.example.com/T0/B0/secret")
    assert isinstance(notifier, JsonWebhook)
    assert notifier.name == "https://hooks.example.com/***"
    assert isinstance(notifier, Notifier)


def test_make_notifier_passes_notifiers_through_and_rejects_the_rest() -> None:
    webhook = JsonWebhook("https://example.com/x")
    assert make_notifier(webhook) is webhook
    with pytest.raises(ConfigError, match="needs a scheme") as caught:
        make_notifier(f"hooks.example.com/{SECRET}")
    assert SECRET not in str(caught.value)
    with pytest.raises(ConfigError, match="send"):
        make_notifier(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "kwargs", "words"),
    [
        ((f"ftp://example.com/{SECRET}",), {}, ["http:// or https://", "make_notifier"]),
        (("https:///nohost",), {}, ["no valid host"]),
        (("https://[::1/x",), {}, ["no valid host"]),
        ((f"https://example.com:{SECRET}/x",), {}, ["no valid host"]),
        (("https://example.com",), {"timeout": 0}, ["timeout", "> 0"]),
        (("https://example.com",), {"timeout": math.inf}, ["timeout", "finite"]),
        (("https://example.com",), {"headers": {"X": 1}}, ["headers", "str"]),
    ],
)
def test_bad_webhook_settings_are_config_errors(args: tuple, kwargs: dict,
                                                words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        JsonWebhook(*args, **kwargs)
    for word in words:
        assert word in str(caught.value)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"backoff_initial": -1.0}, "backoff_initial"),
        ({"backoff_max": math.nan}, "backoff_max"),
        ({"backoff_initial": 5.0, "backoff_max": 1.0}, "backoff_max must be ≥ backoff_initial"),
        ({"max_pending": 0}, "max_pending"),
    ],
)
def test_bad_dispatcher_settings_are_config_errors(kwargs: dict, word: str) -> None:
    with pytest.raises(ConfigError, match=word):
        Dispatcher([], **kwargs)


def test_dispatcher_needs_a_list_of_notifiers() -> None:
    with pytest.raises(ConfigError, match="wrap a single one in a list"):
        Dispatcher("https://example.com/x")  # type: ignore[arg-type]


# ------------------------------------------------------------------------ JsonWebhook, for real
def test_webhook_posts_the_payload_with_an_idempotency_key(receiver: WebhookReceiver) -> None:
    notification = _notification()
    JsonWebhook(receiver.url("/alerts"), headers={"Authorization": "Bearer abc"}).send(
        notification
    )
    (request,) = receiver.requests
    assert (request.method, request.path) == ("POST", "/alerts")
    assert request.header("Content-Type") == "application/json"
    assert request.header("Idempotency-Key") == notification.id
    assert request.header("Authorization") == "Bearer abc"
    assert request.header("User-Agent", ).startswith("gradwatch/")  # type: ignore[union-attr]
    assert request.json() == notification.payload()
    assert Notification.model_validate(request.json()) == notification


@pytest.mark.parametrize(
    ("response", "retryable", "retry_after"),
    [
        (500, True, None),
        (503, True, None),
        ((429, {"Retry-After": "7"}), True, 7.0),
        (404, False, None),
        (401, False, None),
        ((302, {"Location": "/elsewhere"}), False, None),  # not followed: a GET would "succeed"
    ],
)
def test_webhook_raises_on_any_status_outside_2xx(
    receiver: WebhookReceiver, response: int | tuple, retryable: bool, retry_after: float | None
) -> None:
    receiver.respond_with(response)
    with pytest.raises(DeliveryError) as caught:
        JsonWebhook(receiver.url(f"/hook/{SECRET}")).send(_notification())
    status = response if isinstance(response, int) else response[0]
    assert f"HTTP {status}" in str(caught.value)
    assert (caught.value.retryable, caught.value.retry_after) == (retryable, retry_after)
    assert SECRET not in str(caught.value)
    assert len(receiver.requests) == 1


def test_webhook_raises_when_nobody_listens() -> None:
    down = WebhookReceiver().start()
    down.stop()
    with pytest.raises(DeliveryError, match=r"could not reach http://127\.0\.0\.1") as caught:
        JsonWebhook(down.url(f"/hook?token={SECRET}"), timeout=2).send(_notification())
    assert caught.value.retryable and SECRET not in str(caught.value)


# ------------------------------------------------------------------------ Dispatcher, for real
def test_dispatcher_delivers_to_every_notifier(receiver: WebhookReceiver) -> None:
    other = WebhookReceiver().start()
    try:
        with _dispatcher([receiver.url("/a"), JsonWebhook(other.url("/b"))]) as dispatcher:
            dispatcher.submit(_notification(1))
            dispatcher.submit(_notification(2))
            assert dispatcher.flush(5)
        assert [r.json()["step"] for r in receiver.requests] == [1, 2]
        assert [r.json()["step"] for r in other.requests] == [1, 2]
        assert all(s == {"sent": 2, "failed": 0, "retried": 0, "dropped": 0}
                   for s in dispatcher.stats.values())
    finally:
        other.stop()


def test_500_twice_then_200_is_delivered_once_after_retries(
    receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.respond_with(500, 500)
    clock = ManualClock()
    dispatcher = _dispatcher([receiver.url()], clock, backoff_initial=0.5)
    notification = _notification()
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        dispatcher.submit(notification)
        assert dispatcher.flush(5)
    dispatcher.close()
    assert [r.header("Idempotency-Key") for r in receiver.requests] == [notification.id] * 3
    assert dispatcher.stats[receiver.url().replace("/hook", "/***")] == {
        "sent": 1, "failed": 0, "retried": 2, "dropped": 0}
    # backoff: 0.5·2⁰ then 0.5·2¹, each jittered into its upper half
    assert len(clock.sleeps) == 2
    assert 0.25 <= clock.sleeps[0] < 0.5 and 0.5 <= clock.sleeps[1] < 1.0
    assert "delivered to http://127.0.0.1" in caplog.text and "after 3 attempts" in caplog.text


def test_jitter_is_reproducible_with_a_seeded_rng(receiver: WebhookReceiver) -> None:
    sleeps = []
    for _ in range(2):
        receiver.respond_with(503, 503, 503)
        clock = ManualClock()
        with _dispatcher([receiver.url()], clock) as dispatcher:
            dispatcher.submit(_notification())
        sleeps.append(clock.sleeps)
    assert sleeps[0] == sleeps[1] and len(sleeps[0]) == 3


def test_retry_after_is_honoured_up_to_backoff_max(receiver: WebhookReceiver) -> None:
    receiver.respond_with((429, {"Retry-After": "20"}), (503, {"Retry-After": "2"}))
    clock = ManualClock()
    with _dispatcher([receiver.url()], clock, backoff_initial=0.1, backoff_max=5.0) as d:
        d.submit(_notification())
    assert clock.sleeps == [5.0, 2.0]
    assert len(receiver.requests) == 3


def test_a_client_error_is_not_retried(receiver: WebhookReceiver) -> None:
    receiver.respond_with(404)
    with _dispatcher([receiver.url()]) as dispatcher:
        dispatcher.submit(_notification())
    assert len(receiver.requests) == 1
    assert list(dispatcher.stats.values()) == [{"sent": 0, "failed": 1, "retried": 0,
                                                "dropped": 0}]


def test_receiver_down_then_up_is_delivered_after_retries() -> None:
    receiver = WebhookReceiver().start()
    receiver.stop()  # the port is known, nobody listens
    clock = ManualClock()
    clock.on_sleep.append(lambda sleeps: receiver.start() if sleeps == 2 else None)
    try:
        with _dispatcher([receiver.url()], clock) as dispatcher:
            dispatcher.submit(_notification())
            assert dispatcher.flush(5)
        assert len(receiver.requests) == 1  # attempts 1 and 2 were refused
        assert list(dispatcher.stats.values()) == [{"sent": 1, "failed": 0, "retried": 2,
                                                    "dropped": 0}]
    finally:
        receiver.stop()


def test_receiver_never_up_counts_a_failure_and_logs_no_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = WebhookReceiver().start()
    down.stop()
    url = f"http://alice:{SECRET}pw@127.0.0.1:{down.port}/hooks/{SECRET}?token={SECRET}tok"
    with caplog.at_level(logging.DEBUG), _dispatcher([url], max_attempts=3) as dispatcher:
        dispatcher.submit(_notification())
        assert dispatcher.flush(5)
    name = f"http://***@127.0.0.1:{down.port}/***?token=***"
    assert dispatcher.stats == {name: {"sent": 0, "failed": 1, "retried": 2, "dropped": 0}}
    ours = [r for r in caplog.records if r.name == "gradwatch"]
    assert [r.levelno for r in ours] == [logging.WARNING, logging.WARNING, logging.ERROR]
    assert all(name in r.getMessage() for r in ours)
    assert "gave up" in ours[-1].getMessage() and "after 3 attempt(s)" in ours[-1].getMessage()
    for record in caplog.records:  # every logger, every field
        assert SECRET not in record.getMessage()
        assert SECRET not in repr(record.args) and SECRET not in str(record.msg)
        assert record.exc_info is None and record.exc_text is None
    assert SECRET not in caplog.text


def test_errors_of_custom_notifiers_are_logged_with_urls_redacted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Leaky:
        name = f"custom slack://{SECRET}/{SECRET}"

        def send(self, notification: Notification) -> None:
            raise ValueError(f"unknown url type: 'slack://{SECRET}/B0/C0'")

    logs = caplog.at_level(logging.DEBUG, logger="gradwatch")
    with logs, _dispatcher([Leaky()], max_attempts=2) as dispatcher:
        dispatcher.submit(_notification())
    assert list(dispatcher.stats) == ["custom slack://***"]
    assert "ValueError: unknown url type: 'slack://***'" in caplog.text
    assert SECRET not in caplog.text


def test_submit_returns_at_once_while_the_receiver_is_slow(receiver: WebhookReceiver) -> None:
    release = receiver.hold()
    with _dispatcher([receiver.url()]) as dispatcher:
        dispatcher.submit(_notification(1))
        assert receiver.wait_for(1)  # the worker is now stuck in the first request
        started = time.monotonic()
        for step in range(2, 12):
            dispatcher.submit(_notification(step))
        assert time.monotonic() - started < 0.5  # ten submits while the receiver hangs
        assert dispatcher.pending == 11
        assert not dispatcher.flush(0.05)  # still busy: flush says so rather than hanging
        release.set()
        assert dispatcher.flush(5)
    assert [r.json()["step"] for r in receiver.requests] == list(range(1, 12))


def test_a_failing_notifier_does_not_hold_up_a_healthy_one(receiver: WebhookReceiver) -> None:
    failing = _Recorder(fail=True)
    # the real (interruptible) sleep with a long backoff: the retry is not due for ~15-30 s
    dispatcher = Dispatcher([failing, receiver.url()], backoff_initial=30.0, backoff_max=30.0)
    dispatcher.submit(_notification(1))
    assert failing.attempted.wait(5)
    dispatcher.submit(_notification(2))
    assert receiver.wait_for(2)
    started = time.monotonic()
    assert not dispatcher.close(timeout=0.2)  # the retry is still queued: dropped, not waited
    assert time.monotonic() - started < 2.0
    # both notifications failed once; their retries were still due when close gave up
    assert dispatcher.stats[failing.name] == {"sent": 0, "failed": 0, "retried": 2, "dropped": 2}
    assert dispatcher.stats[receiver.url().replace("/hook", "/***")]["sent"] == 2


def test_close_drops_what_is_left_and_later_submits_are_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notifier = _Recorder()
    dispatcher = _dispatcher([notifier])
    assert dispatcher.close()
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        dispatcher.submit(_notification())  # never raises
    assert "closed" in caplog.text
    assert dispatcher.stats["recorder"]["dropped"] == 1 and notifier.sent == []


def test_a_full_queue_drops_new_notifications(receiver: WebhookReceiver) -> None:
    release = receiver.hold()
    with _dispatcher([receiver.url()], max_pending=2) as dispatcher:
        dispatcher.submit(_notification(1))
        assert receiver.wait_for(1)  # in flight, so it counts as pending
        dispatcher.submit(_notification(2))
        dispatcher.submit(_notification(3))  # in flight + 1 queued = 2: this one is dropped
        assert dispatcher.pending == 2
        release.set()
    assert [r.json()["step"] for r in receiver.requests] == [1, 2]
    assert next(iter(dispatcher.stats.values()))["dropped"] == 1


def test_an_exception_that_cannot_be_printed_is_still_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    class Broken:
        name = "broken"

        def send(self, notification: Notification) -> None:
            raise Unprintable()

    with caplog.at_level(logging.ERROR, logger="gradwatch"), _dispatcher(
        [Broken()], max_attempts=1
    ) as dispatcher:
        dispatcher.submit(_notification())
    assert dispatcher.stats["broken"]["failed"] == 1
    assert "Unprintable: (no message)" in caplog.text


def test_submit_never_raises() -> None:
    dispatcher = _dispatcher([_Recorder()])
    dispatcher.submit("not a notification")  # type: ignore[arg-type]
    dispatcher.close()


def test_same_names_are_told_apart() -> None:
    with _dispatcher(["https://hooks.example.com/a", "https://hooks.example.com/b"]) as d:
        assert list(d.stats) == ["https://hooks.example.com/***",
                                 "https://hooks.example.com/*** #2"]


class _Recorder:
    name = "recorder"

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.sent: list[str] = []
        self.attempted = threading.Event()

    def send(self, notification: Notification) -> None:
        self.attempted.set()
        if self.fail:
            raise DeliveryError("down")
        self.sent.append(notification.id)


# ------------------------------------------------------------------------ apprise
@needs_apprise
@apprise_warnings
def test_apprise_json_scheme_posts_to_the_receiver(receiver: WebhookReceiver) -> None:
    notifier = make_notifier(f"json://127.0.0.1:{receiver.port}/apprise")
    assert isinstance(notifier, AppriseNotifier)
    assert notifier.name == f"json://127.0.0.1:{receiver.port}/***"
    notification = _notification()
    notifier.send(notification)
    (request,) = receiver.requests
    assert (request.method, request.path) == ("POST", "/apprise")
    body = request.json()
    assert (body["title"], body["message"], body["type"]) == (
        notification.title, notification.body, "failure")


@needs_apprise
@apprise_warnings
def test_apprise_failure_raises_and_the_dispatcher_retries(receiver: WebhookReceiver) -> None:
    receiver.respond_with(500)
    notifier = AppriseNotifier([f"json://127.0.0.1:{receiver.port}/{SECRET}"])
    with pytest.raises(DeliveryError, match="apprise could not deliver") as caught:
        notifier.send(_notification(kind="resolved"))
    assert SECRET not in str(caught.value)
    receiver.respond_with(500)
    with _dispatcher([notifier]) as dispatcher:
        dispatcher.submit(_notification())
    assert list(dispatcher.stats.values()) == [{"sent": 1, "failed": 0, "retried": 1,
                                                "dropped": 0}]
    assert receiver.requests[-1].json()["type"] == "failure"
    assert receiver.requests[0].json()["type"] == "success"  # resolved


@needs_apprise
@apprise_warnings
def test_apprise_rejects_urls_it_does_not_know() -> None:
    with pytest.raises(ConfigError, match="apprise does not accept") as caught:
        AppriseNotifier(f"nosuchscheme://{SECRET}/x")
    assert SECRET not in str(caught.value)
    with pytest.raises(ConfigError, match="URL strings"):
        AppriseNotifier([])


def test_without_apprise_a_clear_missing_dependency_error() -> None:
    # A fresh interpreter in which `import apprise` fails, so this process is left alone.
    script = (
        "import sys; sys.modules['apprise'] = None\n"
        "from gradwatch.alerts.channels import make_notifier\n"
        "from gradwatch import MissingDependencyError\n"
        "try:\n    make_notifier('slack://A/B/C')\n"
        "except MissingDependencyError as e:\n    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Using apprise notifications, but the 'apprise' package is not installed" in (
        result.stdout)
    assert "pip install 'gradwatch[apprise]'" in result.stdout
