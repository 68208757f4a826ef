"""Real receivers on 127.0.0.1 for notification tests, and a manual clock.

`WebhookReceiver` is a `http.server.ThreadingHTTPServer` on an ephemeral port that records every
request and answers with scripted statuses (200 once the script runs out). It can be stopped and
started again on the same port ("the receiver was down, then came back"), and held with a gate
("the receiver is slow") so tests wait on events rather than on timings::

    with WebhookReceiver() as receiver:
        receiver.respond_with(500, 500)          # then 200
        ...POST to receiver.url("/hook")...
        assert receiver.wait_for(3)
        receiver.requests[0].json()
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: How long a gated request waits at most, so a forgotten gate cannot hang the suite.
GATE_LIMIT_S = 10.0

Response = int | tuple[int, Mapping[str, str]]


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as the receiver saw it."""

    method: str
    path: str
    headers: dict[str, str] = field(repr=False)  # names lower-cased
    body: bytes = field(repr=False)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def json(self) -> Any:
        return json.loads(self.body)


class WebhookReceiver:
    """A recording HTTP receiver on 127.0.0.1 (see the module docstring)."""

    def __init__(self) -> None:
        self.requests: list[ReceivedRequest] = []
        self.port = 0
        self.gate: threading.Event | None = None
        self._script: deque[Response] = deque()
        self._arrived = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self, port: int | None = None) -> WebhookReceiver:
        """Listen on `port` (default: the previous one, or an ephemeral one)."""
        if self._server is not None:
            return self
        handler = type("Handler", (_Handler,), {"receiver": self})
        server = ThreadingHTTPServer(("127.0.0.1", self.port if port is None else port), handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"receiver-{self.port}", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening: connections to `port` are refused until `start()`."""
        if self.gate is not None:
            self.gate.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------ scripting and waiting
    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def respond_with(self, *responses: Response) -> None:
        """Answer the next requests with these statuses (or (status, headers)), then 200."""
        self._script.extend(responses)

    def hold(self) -> threading.Event:
        """Hold every request until the returned event is set (the receiver is slow)."""
        self.gate = threading.Event()
        return self.gate

    def wait_for(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until `count` requests have arrived (a held request counts on arrival)."""
        with self._arrived:
            return self._arrived.wait_for(lambda: len(self.requests) >= count, timeout)

    def _record(self, request: ReceivedRequest) -> Response:
        with self._arrived:
            self.requests.append(request)
            self._arrived.notify_all()
            return self._script.popleft() if self._script else 200


class _Handler(BaseHTTPRequestHandler):
    receiver: WebhookReceiver
    protocol_version = "HTTP/1.1"

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request = ReceivedRequest(
            method=self.command, path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()}, body=body,
        )
        response = self.receiver._record(request)
        gate = self.receiver.gate
        if gate is not None:
            gate.wait(GATE_LIMIT_S)
        status, headers = (response, {}) if isinstance(response, int) else response
        reply = json.dumps({"status": status}).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_POST = do_GET = do_PUT = _handle

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass


@contextmanager
def running_receiver() -> Iterator[WebhookReceiver]:
    """A started receiver, stopped afterwards; as a fixture::

        with running_receiver() as receiver:
            yield receiver
    """
    receiver = WebhookReceiver().start()
    try:
        yield receiver
    finally:
        receiver.stop()


class ManualClock:
    """A clock that moves only when slept on: pass `clock` and `sleep` to a Dispatcher.

    Every sleep is recorded, so tests can assert the backoff schedule without waiting for it.
    `on_sleep` runs after each sleep (e.g. to bring a receiver back up after the second).
    """

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.on_sleep: list[Any] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        for hook in self.on_sleep:
            hook(len(self.sleeps))
