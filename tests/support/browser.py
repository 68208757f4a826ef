"""Headless Chromium for tests, driven over the DevTools protocol (CDP) with a small
standard-library websocket client: no test dependency beyond the browser itself.

    browser = Chromium.launch(tmp_path)              # --remote-debugging-port=0
    page = browser.new_page()                        # a fresh tab, flat-mode CDP session
    page.navigate(path.as_uri())
    page.wait_for("document.body.dataset.rendered === 'true'")
    assert page.errors() == []                       # console errors, exceptions, log errors
    png = page.screenshot(tmp_path / "shot.png")
    browser.close()

One websocket to the browser carries every session (`Target.attachToTarget(flatten=True)`);
events are kept in `Chromium.events` with their `sessionId`, so a test can look at the
messages of one tab, or of an out-of-process iframe it attached to.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["CdpError", "Chromium", "Frame", "Page", "chromium_path"]

#: The flags every test browser gets (no network of its own, no first-run UI, no GPU).
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--mute-audio", "--hide-scrollbars", "--window-size=1280,1000",
    "--remote-debugging-port=0",
)
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def chromium_path() -> str | None:
    """The Chromium binary: $GRADWATCH_CHROMIUM, /usr/bin/chromium, or one on PATH."""
    for candidate in (os.environ.get("GRADWATCH_CHROMIUM"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


class CdpError(RuntimeError):
    """A CDP command answered with an error, or the browser went away."""


class _WebSocket:
    """A blocking RFC 6455 client: text frames out (masked), text frames in (fragmented or
    not); answers pings; enough for CDP."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        self._socket = socket.create_connection((host, port), timeout=timeout)
        self._buffer = b""
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        self._socket.sendall((
            f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode("ascii"))
        while b"\r\n\r\n" not in self._buffer:
            self._fill()
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in lines[0] + " ":
            raise CdpError(f"websocket handshake refused: {lines[0]!r}")
        expected = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines[1:])}
        if headers.get("sec-websocket-accept") != expected:
            raise CdpError("websocket handshake: wrong Sec-WebSocket-Accept")

    def _fill(self) -> None:
        chunk = self._socket.recv(1 << 20)
        if not chunk:
            raise CdpError("the browser closed the DevTools connection")
        self._buffer += chunk

    def _exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._fill()
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + n.to_bytes(2, "big")
        else:
            header += bytes([0x80 | 127]) + n.to_bytes(8, "big")
        mask = os.urandom(4)
        repeated = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
            n, "big") if n else b""
        self._socket.sendall(header + mask + masked)

    def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode("utf-8"))

    def receive(self, timeout: float | None) -> str | None:
        """The next text message, or None when `timeout` passes first."""
        self._socket.settimeout(timeout)
        try:
            if not self._buffer:
                self._fill()
        except TimeoutError:
            return None
        self._socket.settimeout(None)
        pieces: list[bytes] = []
        while True:
            first, second = self._exactly(2)
            opcode, n = first & 0x0F, second & 0x7F
            if n == 126:
                n = int.from_bytes(self._exactly(2), "big")
            elif n == 127:
                n = int.from_bytes(self._exactly(8), "big")
            mask = self._exactly(4) if second & 0x80 else b""
            payload = self._exactly(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x9:  # ping
                self._send_frame(0xA, payload)
                continue
            if opcode == 0x8:
                raise CdpError("the browser closed the DevTools connection")
            if opcode in (0x0, 0x1, 0x2):
                pieces.append(payload)
                if first & 0x80:
                    return b"".join(pieces).decode("utf-8")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send_frame(0x8, b"")
        self._socket.close()


class Chromium:
    """One headless Chromium process with its own fresh profile directory."""

    def __init__(self, process: subprocess.Popen[bytes], profile: Path, socket_: _WebSocket,
                 *, own_profile: bool) -> None:
        self.process = process
        self.profile = profile
        self._ws = socket_
        self._own_profile = own_profile
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    @classmethod
    def launch(cls, profile: Path | None = None, *, executable: str | None = None,
               timeout: float = 30.0) -> Chromium:
        executable = executable or chromium_path()
        if executable is None:
            raise FileNotFoundError("no Chromium binary (set GRADWATCH_CHROMIUM)")
        own = profile is None
        profile = Path(tempfile.mkdtemp(prefix="gradwatch-chromium-")) if profile is None \
            else profile
        profile.mkdir(parents=True, exist_ok=True)
        log = open(profile.parent / f"{profile.name}-chromium.log", "wb")  # noqa: SIM115
        process = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while True:
            lines = port_file.read_text().split("\n") if port_file.exists() else []
            if len(lines) >= 2 and lines[0].strip() and lines[1].strip():
                break
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise CdpError(f"Chromium did not open DevTools within {timeout} s "
                               f"(exit code {process.poll()}); see {log.name}")
            time.sleep(0.05)
        url = f"ws://127.0.0.1:{int(lines[0])}{lines[1].strip()}"
        return cls(process, profile, _WebSocket(url, timeout), own_profile=own)

    def command(self, method: str, params: Mapping[str, Any] | None = None, *,
                session_id: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
        """Send one CDP command and wait for its answer (events meanwhile are kept)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method,
                                   "params": dict(params or {})}
        if session_id is not None:
            message["sessionId"] = session_id
        self._ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CdpError(f"{method}: no answer within {timeout} s")
            incoming = self._read(left)
            if incoming is not None and incoming.get("id") == message["id"]:
                if "error" in incoming:
                    raise CdpError(f"{method}: {incoming['error']}")
                result: dict[str, Any] = incoming.get("result", {})
                return result

    def _read(self, timeout: float) -> dict[str, Any] | None:
        text = self._ws.receive(timeout)
        if text is None:
            return None
        incoming: dict[str, Any] = json.loads(text)
        if "method" in incoming:
            self.events.append(incoming)
        return incoming

    def pump(self, seconds: float) -> None:
        """Collect events for `seconds`."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._read(left)

    def new_page(self) -> Page:
        target = self.command("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.command("Target.attachToTarget",
                               {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, target, session)
        for domain in ("Page", "Runtime", "Log"):
            page.command(f"{domain}.enable")
        return page

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.command("Browser.close", timeout=5)
        self._ws.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, 9)
            self.process.wait()
        if self._own_profile:
            shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """One tab (or an out-of-process iframe: same API, its own session)."""

    def __init__(self, browser: Chromium, target_id: str, session_id: str) -> None:
        self.browser = browser
        self.target_id = target_id
        self.session_id = session_id

    def command(self, method: str, params: Mapping[str, Any] | None = None,
                timeout: float = 30.0) -> dict[str, Any]:
        return self.browser.command(method, params, session_id=self.session_id, timeout=timeout)

    def navigate(self, url: str) -> None:
        answer = self.command("Page.navigate", {"url": url})
        if answer.get("errorText"):
            raise CdpError(f"navigate {url}: {answer['errorText']}")

    def evaluate(self, expression: str, *, context_id: int | None = None) -> Any:
        params: dict[str, Any] = {"expression": expression, "returnByValue": True,
                                  "awaitPromise": True}
        if context_id is not None:
            params["contextId"] = context_id
        answer = self.command("Runtime.evaluate", params)
        if "exceptionDetails" in answer:
            raise CdpError(f"evaluate {expression!r}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def wait_for(self, expression: str, *, timeout: float = 30.0,
                 context_id: int | None = None,
                 fail_if: str | None = None) -> Any:
        """Poll `expression` until it is truthy (returns its value); with `fail_if`, stop
        early with CdpError when that expression is truthy."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression, context_id=context_id)
            if value:
                return value
            if fail_if is not None:
                failure = self.evaluate(fail_if, context_id=context_id)
                if failure:
                    raise CdpError(f"{fail_if!r} became {failure!r}")
            if time.monotonic() > deadline:
                raise CdpError(f"{expression!r} stayed falsy for {timeout} s; "
                               f"errors: {self.errors()}")
            self.browser.pump(0.1)

    def events(self, accept: Callable[[dict[str, Any]], bool] | None = None
               ) -> list[dict[str, Any]]:
        return [event for event in self.browser.events
                if event.get("sessionId") == self.session_id and (accept is None or
                                                                  accept(event))]

    def errors(self, *, context_ids: set[int] | None = None) -> list[str]:
        """Console errors, uncaught exceptions and error log entries of this session (only
        those of the given execution contexts when `context_ids` is set; log entries have no
        context and are then left out)."""
        found = []
        for event in self.events():
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                if context_ids is None or params.get("executionContextId") in context_ids:
                    found.append("console: " + " ".join(
                        str(arg.get("value", arg.get("description", "")))
                        for arg in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                if context_ids is None or details.get("executionContextId") in context_ids:
                    found.append("exception: " + str(details.get("exception", {}).get(
                        "description", details.get("text"))))
            elif method == "Log.entryAdded" and context_ids is None:
                entry = params.get("entry", {})
                if entry.get("level") == "error":
                    found.append(f"log ({entry.get('source')}): {entry.get('text')}")
        return found

    def auto_attach(self) -> None:
        """Attach to this tab's out-of-process iframes as they appear (call before navigating;
        `iframe()` then finds them)."""
        self.command("Target.setAutoAttach", {"autoAttach": True, "flatten": True,
                                              "waitForDebuggerOnStart": False})

    def iframe(self, *, timeout: float = 30.0) -> Frame:
        """The tab's first child frame, once it exists: an out-of-process iframe's own session
        (Chromium isolates sandboxed iframes) or, for an in-process one, an isolated world in
        this session. Console messages and exceptions that came before are replayed when the
        child session enables Runtime."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events(lambda e: e["method"] == "Target.attachedToTarget"):
                info = event["params"]["targetInfo"]
                if info.get("type") == "iframe":
                    child = Page(self.browser, info["targetId"], event["params"]["sessionId"])
                    for domain in ("Page", "Runtime", "Log"):
                        child.command(f"{domain}.enable")
                    return Frame(child, None)
            children = [child["frame"] for child in self.command("Page.getFrameTree")[
                "frameTree"].get("childFrames", [])
                if child["frame"].get("url") not in ("", "about:blank")]  # not yet navigated
            if children:
                frame_id = children[0]["id"]
                world = self.command("Page.createIsolatedWorld",
                                     {"frameId": frame_id, "worldName": "gradwatch-tests"})
                return Frame(self, world["executionContextId"], frame_id)
            if time.monotonic() > deadline:
                raise CdpError(f"no child frame within {timeout} s")
            self.browser.pump(0.2)

    def screenshot(self, path: Path) -> bytes:
        data = base64.b64decode(self.command(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})["data"])
        path.write_bytes(data)
        return data

    def close(self) -> None:
        with contextlib.suppress(CdpError):
            self.browser.command("Target.closeTarget", {"targetId": self.target_id})


class Frame:
    """A child frame: its own session (`context_id` None) or a context in its parent's."""

    def __init__(self, page: Page, context_id: int | None, frame_id: str | None = None) -> None:
        self.page = page
        self.context_id = context_id
        self.frame_id = frame_id

    def evaluate(self, expression: str) -> Any:
        return self.page.evaluate(expression, context_id=self.context_id)

    def wait_for(self, expression: str, *, timeout: float = 30.0,
                 fail_if: str | None = None) -> Any:
        return self.page.wait_for(expression, timeout=timeout, context_id=self.context_id,
                                  fail_if=fail_if)

    def errors(self) -> list[str]:
        if self.frame_id is None:
            return self.page.errors()
        contexts = {
            event["params"]["context"]["id"]
            for event in self.page.events(lambda e: e["method"] ==
                                          "Runtime.executionContextCreated")
            if event["params"]["context"].get("auxData", {}).get("frameId") == self.frame_id
        }
        return self.page.errors(context_ids=contexts)
